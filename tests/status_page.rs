//! The admin address: the status page in a real headless Chromium, and
//! who may change what (the origin check, JSON only, the token), with a
//! real balancer and real backends.

use std::net::SocketAddr;
use std::time::Duration;

use fantoccini::{Client as Page, Locator};
use http::Method;
use nix::sys::signal::Signal;
use spike_tests::backend::Backend;
use spike_tests::balancer::{Balancer, config};
use spike_tests::browser::Browser;
use spike_tests::client::Client;
use spike_tests::traffic::{Load, backend_process};
use spike_tests::wait_until_async;

/// Fast checks, so that a state changes within a second or two.
const FAST_CHECKS: &str =
    "[health]\ninterval = \"200ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 3\n";
const TOKEN: &str = "s3cret-admin-token-0123";

/// One browser at a time: four Chromiums at once on two cores make every
/// deadline of these tests a race.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A balancer's configuration `text` with the admin token set.
fn with_token(text: &str) -> String {
    text.replacen(
        "admin = \"127.0.0.1:0\"\n",
        &format!("admin = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\n"),
        1,
    )
}

/// The text of the cell `class` of the row of `addr`, if the page shows it.
async fn cell(page: &Page, addr: SocketAddr, class: &str) -> Option<String> {
    let selector = format!("tr[data-upstream='{addr}'] td.{class}");
    page.find(Locator::Css(&selector))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// Waits until the cell `class` of `addr` satisfies `test`.
async fn wait_for_cell(
    page: &Page,
    addr: SocketAddr,
    class: &str,
    within: Duration,
    test: impl Fn(&str) -> bool,
) {
    wait_until_async(&format!("{addr}'s {class} on the page"), within, || async {
        cell(page, addr, class)
            .await
            .is_some_and(|text| test(&text))
    })
    .await;
}

/// A browser on the balancer's status page, once it shows `addr`'s row.
async fn open_page(balancer: &Balancer, addr: SocketAddr) -> Browser {
    let browser = Browser::start().await;
    let page = browser.client();
    page.goto(&balancer.admin_url("/")).await.unwrap();
    wait_for_cell(page, addr, "weight", Duration::from_secs(10), |_| true).await;
    browser
}

/// The rows of the upstreams table, in order: address and weight.
async fn rows(page: &Page) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for row in page
        .find_all(Locator::Css("#upstreams tbody tr"))
        .await
        .unwrap_or_default()
    {
        let text = |class: &'static str| {
            let row = row.clone();
            async move {
                let cell = row.find(Locator::Css(&format!("td.{class}"))).await.ok()?;
                cell.text().await.ok()
            }
        };
        if let (Some(addr), Some(weight)) = (text("addr").await, text("weight").await) {
            rows.push((addr, weight));
        }
    }
    rows
}

/// Clicks the element `selector`, found anew until the click lands (the
/// page updates every second).
async fn click(page: &Page, selector: &str) {
    wait_until_async(
        &format!("a click on {selector}"),
        Duration::from_secs(5),
        || async {
            match page.find(Locator::Css(selector)).await {
                Ok(element) => element.click().await.is_ok(),
                Err(_) => false,
            }
        },
    )
    .await;
}

/// Waits until the page's message says `text`.
async fn wait_for_message(page: &Page, text: &str) {
    wait_until_async(
        &format!("the message {text:?}"),
        Duration::from_secs(5),
        || async {
            match page.find(Locator::Id("message")).await {
                Ok(message) => message.text().await.is_ok_and(|shown| shown == text),
                Err(_) => false,
            }
        },
    )
    .await;
}

/// Accepts the confirmation the page asks for, once it is up; returns
/// its question.
async fn confirm(page: &Page) -> String {
    wait_until_async(
        "the page to ask for confirmation",
        Duration::from_secs(5),
        || async { page.get_alert_text().await.is_ok() },
    )
    .await;
    let question = page.get_alert_text().await.unwrap();
    page.accept_alert().await.unwrap();
    question
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_upstreams_and_follows_a_dead_one_live() {
    let _one = ONE_BROWSER.lock().await;
    let mut backends: Vec<_> = (0..4)
        .map(|i| backend_process(&format!("b{i}"), "127.0.0.1:0"))
        .collect();
    let upstreams: Vec<(SocketAddr, u32)> = backends.iter().map(|b| b.addr()).zip(1..).collect();
    let balancer = Balancer::start(&upstreams, FAST_CHECKS);
    let load = Load::start(balancer.url("/"), 4);
    let browser = Browser::start().await;
    let page = browser.client();
    page.goto(&balancer.admin_url("/")).await.unwrap();

    let expected: Vec<(String, String)> = upstreams
        .iter()
        .map(|(addr, weight)| (addr.to_string(), weight.to_string()))
        .collect();
    wait_until_async(
        "the four upstreams on the page",
        Duration::from_secs(10),
        || async { rows(page).await == expected },
    )
    .await;
    // Rates come from two polls a second apart: the traffic shows.
    let busy = upstreams[3].0;
    wait_for_cell(page, busy, "rps", Duration::from_secs(5), |rps| {
        rps.replace(',', "")
            .parse::<f64>()
            .is_ok_and(|rps| rps > 0.0)
    })
    .await;

    // A backend killed under load: its row turns down, or resting, without
    // a reload of the page.
    let dead = upstreams[1].0;
    backends[1].signal(Signal::SIGKILL);
    backends[1].wait(Duration::from_secs(5));
    wait_for_cell(page, dead, "state", Duration::from_secs(5), |state| {
        state.starts_with("down") || state.starts_with("resting")
    })
    .await;
    let row = format!("tr[data-upstream='{dead}']");
    wait_until_async(
        "the row coloured as it is",
        Duration::from_secs(5),
        || async {
            let Ok(element) = page.find(Locator::Css(&row)).await else {
                return false;
            };
            let class = element
                .attr("class")
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            class.contains("down") || class.contains("resting")
        },
    )
    .await;

    // Back on its port: the row comes back up.
    backends[1] = backend_process("b1", &dead.to_string());
    wait_for_cell(page, dead, "state", Duration::from_secs(10), |state| {
        state.starts_with("up") || state.starts_with("ramping")
    })
    .await;
    let (ok, _) = load.stop().await;
    assert!(ok > 0);
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_from_the_page_stops_the_upstreams_traffic() {
    let _one = ONE_BROWSER.lock().await;
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let balancer = Balancer::start(&[(a.addr(), 1), (b.addr(), 1)], "");
    let browser = open_page(&balancer, a.addr()).await;
    let page = browser.client();

    let row = format!("tr[data-upstream='{}']", a.addr());
    click(page, &format!("{row} button.drain")).await;
    let question = confirm(page).await;
    assert!(
        question.starts_with(&format!("Drain {}?", a.addr())),
        "{question}"
    );
    wait_for_message(page, &format!("{}: drain done; weight now 0.", a.addr())).await;
    wait_for_cell(page, a.addr(), "state", Duration::from_secs(5), |s| {
        s == "draining"
    })
    .await;
    wait_for_cell(page, a.addr(), "weight", Duration::from_secs(5), |w| {
        w == "0 (file: 1)"
    })
    .await;

    // Counted at the backends: a gets nothing more.
    let (a_before, b_before) = (a.hits(), b.hits());
    let client = Client::new();
    for _ in 0..50 {
        assert_eq!(client.get(&balancer.url("/")).await.status, 200);
    }
    assert_eq!((a.hits() - a_before, b.hits() - b_before), (0, 50));

    // Set its weight: the page asks for it, then for confirmation.
    click(page, &format!("{row} button.set-weight")).await;
    wait_until_async(
        "the page to ask for a weight",
        Duration::from_secs(5),
        || async { page.get_alert_text().await.is_ok() },
    )
    .await;
    page.send_alert_text("3").await.unwrap();
    page.accept_alert().await.unwrap();
    let question = confirm(page).await;
    assert_eq!(question, format!("Set the weight of {} to 3?", a.addr()));
    wait_for_cell(page, a.addr(), "weight", Duration::from_secs(5), |w| {
        w == "3 (file: 1)"
    })
    .await;
    // And restore it to the file's.
    click(page, &format!("{row} button.restore")).await;
    confirm(page).await;
    wait_for_cell(page, a.addr(), "weight", Duration::from_secs(5), |w| {
        w == "1"
    })
    .await;
    wait_for_cell(page, a.addr(), "state", Duration::from_secs(5), |s| {
        s == "up"
    })
    .await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_configuration_file_shows_its_error_with_line_and_column() {
    let _one = ONE_BROWSER.lock().await;
    let a = Backend::named("a").await;
    let text = config(&[(a.addr(), 1)], "");
    let balancer = Balancer::with_config(&text);
    let browser = open_page(&balancer, a.addr()).await;
    let page = browser.client();

    let lines = text.lines().count();
    balancer.rewrite_config(&format!("{text}\n[proxy]\nretries = \"many\"\n"));
    let banner = page.find(Locator::Id("config-error")).await.unwrap();
    wait_until_async("the error on the page", Duration::from_secs(10), || async {
        banner.is_displayed().await.unwrap_or(false)
    })
    .await;
    let shown = banner.text().await.unwrap();
    let located = format!("balancer.toml:{}:11:", lines + 3);
    assert!(shown.contains(&located), "{located} in {shown:?}");
    assert!(shown.contains("The last reload failed"), "{shown}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_for_it_once() {
    let _one = ONE_BROWSER.lock().await;
    let a = Backend::named("a").await;
    let balancer = Balancer::with_config(&with_token(&config(&[(a.addr(), 1)], "")));
    let browser = Browser::start().await;
    let page = browser.client();
    page.goto(&balancer.admin_url("/")).await.unwrap();
    let form = page.find(Locator::Id("token-form")).await.unwrap();
    wait_until_async(
        "the page to ask for the token",
        Duration::from_secs(10),
        || async { form.is_displayed().await.unwrap_or(false) },
    )
    .await;
    assert!(
        rows(page).await.is_empty(),
        "nothing shown without the token"
    );
    page.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    page.find(Locator::Css("#token-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for_cell(page, a.addr(), "weight", Duration::from_secs(10), |w| {
        w == "1"
    })
    .await;
    let kept: serde_json::Value = page
        .execute("return sessionStorage.getItem('spike-admin-token')", vec![])
        .await
        .unwrap();
    assert_eq!(kept, TOKEN, "kept for the tab");
    // Asked once: the tab, reloaded, shows the page at once.
    page.refresh().await.unwrap();
    wait_for_cell(page, a.addr(), "weight", Duration::from_secs(10), |w| {
        w == "1"
    })
    .await;
    let form = page.find(Locator::Id("token-form")).await.unwrap();
    assert!(!form.is_displayed().await.unwrap());
    browser.close().await;
}

/// The weight of `addr` in the balancer's `/stats`, read with `token`.
async fn weight(balancer: &Balancer, addr: SocketAddr, token: Option<&str>) -> u64 {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let req = Client::request(Method::GET, &balancer.admin_url("/stats"), &headers, b"");
    let stats = Client::new().send(req).await.unwrap().json();
    stats["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["addr"] == addr.to_string())
        .unwrap()["weight"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_from_another_site_is_refused_and_changes_nothing() {
    let a = Backend::named("a").await;
    let balancer = Balancer::start(&[(a.addr(), 2)], "");
    let client = Client::new();
    let url = balancer.admin_url(&format!("/upstreams/{}/drain", a.addr()));
    let json = ("content-type", "application/json");
    let send = |headers: Vec<(&'static str, String)>| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            client
                .send(Client::request(Method::POST, &url, &headers, b"{}"))
                .await
                .unwrap()
        }
    };
    let own = format!("http://{}", balancer.admin());

    let foreign = send(vec![
        (json.0, json.1.into()),
        ("origin", "http://evil.example".into()),
    ])
    .await;
    assert_eq!(foreign.status, 403);
    assert_eq!(foreign.json()["error"], "foreign_origin");
    let referred = send(vec![
        (json.0, json.1.into()),
        ("referer", "http://evil.example/attack.html".into()),
    ])
    .await;
    assert_eq!(referred.status, 403);
    let opaque = send(vec![(json.0, json.1.into()), ("origin", "null".into())]).await;
    assert_eq!(opaque.status, 403, "a sandboxed frame or a redirect");
    // A browser's preflight of a cross-site JSON request gets no CORS
    // header: the request itself is never sent.
    let preflight = client
        .send(Client::request(
            Method::OPTIONS,
            &url,
            &[
                ("origin", "http://evil.example"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "content-type"),
            ],
            b"",
        ))
        .await
        .unwrap();
    assert!(!preflight.status.is_success(), "{}", preflight.status);
    assert!(
        !preflight
            .headers
            .contains_key("access-control-allow-origin")
    );
    // A site that points its own name at this machine (DNS rebinding)
    // cannot even read.
    let rebound = client
        .send(Client::request(
            Method::GET,
            &balancer.admin_url("/stats"),
            &[("host", &format!("evil.example:{}", balancer.admin().port()))],
            b"",
        ))
        .await
        .unwrap();
    assert_eq!(rebound.status, 403);
    assert_eq!(rebound.json()["error"], "foreign_host");
    // A form's content type, even from the page's own origin.
    let form = send(vec![
        ("content-type", "application/x-www-form-urlencoded".into()),
        ("origin", own.clone()),
    ])
    .await;
    assert_eq!(form.status, 415);
    assert_eq!(
        weight(&balancer, a.addr(), None).await,
        2,
        "nothing changed"
    );

    let from_the_page = send(vec![(json.0, json.1.into()), ("origin", own)]).await;
    assert_eq!(from_the_page.status, 200, "{}", from_the_page.text());
    assert_eq!(weight(&balancer, a.addr(), None).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_set_every_admin_request_but_the_page_and_metrics_needs_it() {
    let a = Backend::named("a").await;
    let balancer = Balancer::with_config(&with_token(&config(&[(a.addr(), 2)], "")));
    let client = Client::new();
    let stats = client.get(&balancer.admin_url("/stats")).await;
    assert_eq!(stats.status, 401);
    assert_eq!(
        stats.headers["www-authenticate"],
        "Bearer realm=\"spike admin\""
    );
    let bearer = format!("Bearer {TOKEN}");
    let wrong = "Bearer s3cret-admin-token-0124".to_owned();
    let drain = balancer.admin_url(&format!("/upstreams/{}/drain", a.addr()));
    for auth in [None, Some(&wrong)] {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(auth) = auth {
            headers.push(("authorization", auth.as_str()));
        }
        let reply = client
            .send(Client::request(Method::POST, &drain, &headers, b"{}"))
            .await
            .unwrap();
        assert_eq!(reply.status, 401);
    }
    assert_eq!(
        weight(&balancer, a.addr(), Some(TOKEN)).await,
        2,
        "nothing changed"
    );
    let reply = client
        .send(Client::request(
            Method::POST,
            &drain,
            &[
                ("content-type", "application/json"),
                ("authorization", &bearer),
            ],
            b"{}",
        ))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(weight(&balancer, a.addr(), Some(TOKEN)).await, 0);

    // Open to all: the page itself, and the metrics a scraper reads.
    let metrics = client.get(&balancer.admin_url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    let page = client.get(&balancer.admin_url("/")).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<title>spike balancer</title>"));
    let policy = page.headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
}
