//! Named buyers, as the tests drive them through a node or the balancer:
//! a purchase, a payment, and many of either at once.

use crate::client::{Client, Reply};

/// A purchase's answer: its status, and the order id and ticket of a 200.
pub async fn buy(client: &Client, url: &str, buyer: &str) -> (u16, Option<(String, u64)>) {
    let reply = client.get(&format!("{url}/buy/ticket?user={buyer}")).await;
    let status = reply.status.as_u16();
    let order = (status == 200).then(|| {
        let body = reply.json();
        (
            body["order_id"].as_str().unwrap().to_owned(),
            body["ticket"].as_u64().unwrap(),
        )
    });
    (status, order)
}

/// Pays `order` as `buyer`.
pub async fn pay(client: &Client, url: &str, order: &str, buyer: &str) -> Reply {
    client
        .post(&format!("{url}/orders/{order}/pay?user={buyer}"))
        .await
}

/// Pays every order of `orders` (order id, buyer), 50 at a time; the
/// answers in order.
pub async fn pay_all(client: &Client, url: &str, orders: &[(String, String)]) -> Vec<Reply> {
    let mut answers = Vec::with_capacity(orders.len());
    for batch in orders.chunks(50) {
        let calls = batch.iter().map(|(id, buyer)| {
            let (client, url, id, buyer) =
                (client.clone(), url.to_owned(), id.clone(), buyer.clone());
            tokio::spawn(async move { pay(&client, &url, &id, &buyer).await })
        });
        for call in calls.collect::<Vec<_>>() {
            answers.push(call.await.unwrap());
        }
    }
    answers
}

/// Every buyer of `buyers` buys once, 50 at a time; their answers in order.
pub async fn buy_all(
    client: &Client,
    url: &str,
    buyers: impl Iterator<Item = String>,
) -> Vec<(u16, Option<(String, u64)>)> {
    let buyers: Vec<String> = buyers.collect();
    let mut answers = Vec::with_capacity(buyers.len());
    for batch in buyers.chunks(50) {
        let calls = batch.iter().map(|buyer| {
            let (client, url, buyer) = (client.clone(), url.to_owned(), buyer.clone());
            tokio::spawn(async move { buy(&client, &url, &buyer).await })
        });
        for call in calls.collect::<Vec<_>>() {
            answers.push(call.await.unwrap());
        }
    }
    answers
}
