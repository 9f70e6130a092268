//! Replica notifications on PostgreSQL: the signals of one server reach the others through
//! LISTEN/NOTIFY, so a cancel reaches a runner whichever replica holds its session, and a
//! job submitted on one replica wakes runners waiting on another.
//!
//! Payload: `<origin>|<item>,<item>…` where an item is `j<uuid>` (job changed), `r<uuid>`
//! (runner has commands) or `w` (work available). A replica ignores its own notifications.
use std::{sync::Arc, time::Duration};

use sea_orm::sqlx::{self, postgres::PgListener};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::{
    signals::{Hub, Signals, stopped},
    store::Store,
};

/// The channel name.
const CHANNEL: &str = "gantry_signals";
/// PostgreSQL refuses payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7000;

/// Runs both directions until shutdown.
pub async fn run(store: Store, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    let origin = Uuid::now_v7().simple().to_string();
    let (tx, rx) = mpsc::channel(1024);
    hub.set_outbound(tx);
    let sender = tokio::spawn(send_loop(store.clone(), origin.clone(), rx));
    loop {
        tokio::select! {
            r = listen(&store, &hub, &origin) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "replica notifications interrupted; reconnecting");
                }
            }
            _ = stopped(&mut shutdown) => break,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped(&mut shutdown) => break,
        }
    }
    sender.abort();
}

async fn listen(store: &Store, hub: &Hub, origin: &str) -> Result<(), sqlx::Error> {
    let pool = store.db().get_postgres_connection_pool();
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    // Anything may have happened while we were not listening.
    hub.publish_local(&Signals {
        work: true,
        ..Default::default()
    });
    loop {
        let n = listener.recv().await?;
        if let Some(signals) = parse(n.payload(), origin) {
            hub.publish_local(&signals);
        }
    }
}

async fn send_loop(store: Store, origin: String, mut rx: mpsc::Receiver<Signals>) {
    while let Some(first) = rx.recv().await {
        let mut signals = first;
        while let Ok(more) = rx.try_recv() {
            signals.merge(more);
        }
        for payload in encode(&signals, &origin) {
            let pool = store.db().get_postgres_connection_pool();
            if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(&payload)
                .execute(pool)
                .await
            {
                tracing::warn!(error = %e, "could not notify other replicas");
            }
        }
    }
}

fn encode(signals: &Signals, origin: &str) -> Vec<String> {
    let mut items: Vec<String> = Vec::new();
    if signals.work {
        items.push("w".into());
    }
    items.extend(signals.runners.iter().map(|r| format!("r{}", r.simple())));
    items.extend(signals.jobs.iter().map(|j| format!("j{}", j.simple())));
    let mut payloads = Vec::new();
    let mut current = format!("{origin}|");
    for item in items {
        if current.len() + item.len() + 1 > MAX_PAYLOAD {
            payloads.push(std::mem::replace(&mut current, format!("{origin}|")));
        }
        if !current.ends_with('|') {
            current.push(',');
        }
        current.push_str(&item);
    }
    if !current.ends_with('|') {
        payloads.push(current);
    }
    payloads
}

fn parse(payload: &str, origin: &str) -> Option<Signals> {
    let (from, items) = payload.split_once('|')?;
    if from == origin {
        return None;
    }
    let mut signals = Signals::default();
    for item in items.split(',') {
        match item.split_at_checked(1) {
            Some(("w", _)) => signals.work = true,
            Some(("r", id)) => {
                signals.runners.extend(Uuid::try_parse(id).ok());
            }
            Some(("j", id)) => {
                signals.jobs.extend(Uuid::try_parse(id).ok());
            }
            _ => {}
        }
    }
    Some(signals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_skip_their_origin() {
        let mut s = Signals {
            work: true,
            ..Default::default()
        };
        let (j, r) = (Uuid::now_v7(), Uuid::now_v7());
        s.jobs.insert(j);
        s.runners.insert(r);
        let payloads = encode(&s, "me");
        assert_eq!(payloads.len(), 1);
        assert!(parse(&payloads[0], "me").is_none());
        let back = parse(&payloads[0], "other").expect("parsed");
        assert!(back.work);
        assert!(back.jobs.contains(&j));
        assert!(back.runners.contains(&r));
    }

    #[test]
    fn large_signal_sets_are_split_below_the_payload_limit() {
        let mut s = Signals::default();
        for _ in 0..1000 {
            s.jobs.insert(Uuid::now_v7());
        }
        let payloads = encode(&s, "me");
        assert!(payloads.len() > 1);
        assert!(payloads.iter().all(|p| p.len() <= MAX_PAYLOAD));
        let total: usize = payloads
            .iter()
            .map(|p| parse(p, "x").expect("parsed").jobs.len())
            .sum();
        assert_eq!(total, 1000);
    }
}
