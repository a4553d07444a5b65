//! The `balancer` command line: a bad configuration is refused, located,
//! and nothing starts.

use spike_tests::balancer::config;
use spike_tests::process::run;

/// Runs the balancer on `text`; returns (success, stdout, stderr, path).
fn balancer_with(text: &str) -> (bool, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("balancer.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_owned();
    let (status, stdout, stderr) = run("balancer", &["--config", &path]);
    (status.success(), stdout, stderr, path)
}

#[test]
fn every_kind_of_bad_config_is_located_and_starts_nothing() {
    let one = config(&[("127.0.0.1:3001".parse().unwrap(), 1)], "");
    let cases = [
        (
            one.replace("weight = 1", "weigth = 1"),
            "6:1",
            "unknown field `weigth`",
        ),
        (
            format!("{one}[[upstream]]\naddr = \"127.0.0.1:3001\"\n"),
            "9:8",
            "duplicate upstream 127.0.0.1:3001",
        ),
        (
            one.replace("weight = 1", "weight = -2"),
            "6:10",
            "weight must be an integer from 0",
        ),
        (
            one.replace("weight = 1", "weight = 2.5"),
            "6:10",
            "invalid type",
        ),
        (
            one.replace("127.0.0.1:3001", "localhost:3001"),
            "5:8",
            "is not a socket address",
        ),
        (
            one.replace("\"127.0.0.1:0\"\nadmin", "\"127.0.0.1:99999\"\nadmin"),
            "1:10",
            "is not a socket address",
        ),
        (
            "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nupstream = []\n".to_owned(),
            "3:12",
            "at least one [[upstream]]",
        ),
        (one.replace("[[upstream]]", "[[upstream"), "4:", ""),
        // A probe path that could not be sent: refused here, not left to
        // kill the checks later.
        (
            format!("{one}[health]\npath = \"/he<alth>\"\n"),
            "9:8",
            "path `/he<alth>` is not a request path",
        ),
        (
            format!("{one}[health]\nfail_on = [\"http_503\", \"5xx\"]\n"),
            "9:11",
            "`5xx` is not a failure",
        ),
    ];
    for (text, place, message) in cases {
        let (ok, stdout, stderr, path) = balancer_with(&text);
        assert!(!ok, "accepted:\n{text}");
        assert!(!stdout.contains("listening"), "started:\n{text}");
        assert!(
            stderr.contains(&format!("{path}:{place}")),
            "{stderr}\nfor:\n{text}"
        );
        assert!(stderr.contains(message), "{stderr}\nfor:\n{text}");
    }
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let (status, _, stderr) = run("balancer", &["--config", "/nonexistent/balancer.toml"]);
    assert!(!status.success());
    assert!(
        stderr.contains("cannot read /nonexistent/balancer.toml"),
        "{stderr}"
    );
}

#[test]
fn help_describes_the_config_flag() {
    let (status, stdout, _) = run("balancer", &["--help"]);
    assert!(status.success());
    assert!(stdout.contains("--config <FILE>"), "{stdout}");
}
