//! The front door's MQTT decoder, on whatever a client sends: the first
//! byte picks how the connection starts (a CONNECT read first, or packets
//! of MQTT 3.1.1 or 5 straight away), the rest is the byte stream. Every
//! packet decodes or fails; nothing panics or grows without bound.
#![no_main]

use fleet_broker::frontdoor::codec::{Framed, Version};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    // With a clock: a refusal the decoder writes back is bounded in time.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(stream.len().max(1));
        theirs.write_all(stream).await.unwrap();
        drop(theirs);
        let mut framed = Framed::new(ours, 64 * 1024);
        match mode % 3 {
            0 => {
                if framed.read_connect().await.is_err() {
                    return;
                }
            }
            1 => framed.version = Version::V311,
            _ => framed.version = Version::V5,
        }
        // At most as many packets as there are bytes: each takes two.
        for _ in 0..stream.len() {
            if framed.read().await.is_err() {
                break;
            }
        }
    });
});
