//! The count of refusals logged at DEBUG is told when a flood ends, though
//! nothing of the kind comes after it. A test binary of its own: the log
//! it reads is its broker's alone.

use std::time::Duration;

use fleet_testkit::{eventually, logged, plain_connack, Fleet};

const T: Duration = Duration::from_secs(30);

/// Refused CONNECTs, sent one after the other: far more than the 20 a
/// second logged at WARN.
const FLOOD: usize = 200;

#[tokio::test]
async fn refusals_kept_quiet_are_counted_in_the_log_when_the_flood_ends() {
    let fleet = Fleet::start().await.unwrap();
    let addr = fleet.broker.bootstrap_plain_addr.unwrap();
    for i in 0..FLOOD {
        let ack = plain_connack(addr, &format!("not a device id {i}"), T)
            .await
            .unwrap();
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x02], "identifier rejected");
    }

    // Nothing comes after the flood: the count of its last second is told
    // all the same, and every refusal is either logged or counted.
    let (loud, quiet) = eventually(T, "every refusal logged or counted", || {
        let loud = logged("connection refused").len();
        let quiet: usize = logged("refused CONNECTs logged at debug level")
            .iter()
            .map(|line| {
                let count = line.split("quieted=").nth(1).expect("a count");
                count.trim().parse::<usize>().expect("a number")
            })
            .sum();
        async move { (loud + quiet == FLOOD).then_some((loud, quiet)) }
    })
    .await
    .unwrap();
    assert!(loud >= 20 && quiet > 0, "{loud} logged, {quiet} counted");
}
