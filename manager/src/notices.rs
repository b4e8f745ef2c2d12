//! Service-change notices, paced: the operator API and the manager's
//! broker connection queue changes, and one task sends their notices.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::AsyncClient;
use tokio_util::sync::CancellationToken;

use crate::handlers::Core;

/// A device's change whose notices are to be sent: built when they go
/// out, and only if the change is still the device's pending one.
#[derive(Debug, Clone)]
pub struct QueuedChange {
    pub device_id: String,
    pub change_id: String,
}

impl QueuedChange {
    /// The device's pending change, if it has one.
    pub fn pending_of(device: &crate::store::DeviceRecord) -> Option<QueuedChange> {
        Some(QueuedChange {
            device_id: device.device_id.clone(),
            change_id: device.pending.as_ref()?.change_id.clone(),
        })
    }
}

/// Where the operator API leaves the changes to announce, for
/// [`pace_notices`].
#[derive(Clone)]
pub struct NoticeQueue(tokio::sync::mpsc::UnboundedSender<Vec<QueuedChange>>);

impl NoticeQueue {
    /// A queue and its receiving end, for [`pace_notices`].
    pub fn new() -> (
        NoticeQueue,
        tokio::sync::mpsc::UnboundedReceiver<Vec<QueuedChange>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (NoticeQueue(tx), rx)
    }

    pub fn push(&self, notices: Vec<QueuedChange>) {
        // The pacer ends only at shutdown; the change is recorded, and its
        // notices are sent again when the manager next starts.
        let _ = self.0.send(notices);
    }
}

/// Sends the notices of the queued changes, at most `per_sec` notices a
/// second (a device gets two: its tenant's topic and its bootstrap topic)
/// in ticks of 100 ms, so a fleet-wide change does not arrive as one
/// thundering herd of re-keys and reconnects. It runs on its own, not in
/// the operator's request: a change of a whole fleet takes longer to
/// announce than any request may take (5,000 devices at 200 notices a
/// second: 50 s), and the notices after a request's deadline were lost
/// until the manager restarted. A notice is built when it goes out, and
/// not at all for a change applied or replaced meanwhile (a device would
/// take a replaced change's notice, whose `seq` is above its last, and be
/// refused the service at its `update`).
pub async fn pace_notices(
    queued: tokio::sync::mpsc::UnboundedReceiver<Vec<QueuedChange>>,
    core: Arc<Core>,
    client: AsyncClient,
    per_sec: usize,
    shutdown: CancellationToken,
) {
    let changes_per_sec = (per_sec / crate::handlers::NOTICES_PER_CHANGE).max(1);
    pace(queued, changes_per_sec, shutdown, |tick| {
        let (core, client) = (core.clone(), client.clone());
        async move {
            let built = tokio::task::spawn_blocking(move || {
                tick.iter()
                    .flat_map(|q| core.notices_if_pending(&q.device_id, &q.change_id))
                    .collect()
            })
            .await;
            if let Ok(notices) = built {
                crate::mqtt::publish_all(&client, notices).await;
            }
        }
    })
    .await
}

/// [`pace_notices`] with the sending given.
async fn pace<T, F, Fut>(
    mut queued: tokio::sync::mpsc::UnboundedReceiver<Vec<T>>,
    per_sec: usize,
    shutdown: CancellationToken,
    mut send: F,
) where
    F: FnMut(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let per_tick = (per_sec / 10).max(1);
    let mut waiting = std::collections::VecDeque::new();
    let mut next = tokio::time::Instant::now();
    loop {
        if waiting.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = queued.recv() => match got {
                    Some(notices) => waiting.extend(notices),
                    None => return,
                },
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        while let Ok(notices) = queued.try_recv() {
            waiting.extend(notices);
        }
        let tick: Vec<_> = waiting.drain(..per_tick.min(waiting.len())).collect();
        send(tick).await;
        next = tokio::time::Instant::now() + Duration::from_millis(100);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Notices go out at most a tenth of the rate every 100 ms, however they
    /// were queued, and all of them: those of a second change too, and after
    /// the request that queued them is long over.
    #[tokio::test(start_paused = true)]
    async fn notices_are_paced_and_none_is_dropped() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let pacer = tokio::spawn({
            let sent = sent.clone();
            pace(rx, 100, shutdown.clone(), move |tick: Vec<u32>| {
                sent.lock()
                    .unwrap()
                    .push((start.elapsed().as_millis(), tick));
                async {}
            })
        });
        tx.send((0..25).collect()).unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        // A second change while the first is still being announced: its
        // notices fill the first one's last tick...
        tx.send((100..103).collect()).unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // ...and a third long after: sent at once.
        tx.send(vec![200]).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        shutdown.cancel();
        pacer.await.unwrap();

        let sent = sent.lock().unwrap();
        let at: Vec<u128> = sent.iter().map(|(t, _)| *t).collect();
        let sizes: Vec<usize> = sent.iter().map(|(_, n)| n.len()).collect();
        assert_eq!(at, [0, 100, 200, 1250]);
        assert_eq!(sizes, [10, 10, 8, 1], "{sent:?}");
        let all: Vec<u32> = sent.iter().flat_map(|(_, n)| n.clone()).collect();
        let want: Vec<u32> = (0..25).chain(100..103).chain([200]).collect();
        assert_eq!(all, want);
    }
}
