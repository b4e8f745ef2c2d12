//! Clients that vanish between CONNECT and CONNACK must not keep the
//! router's connection slots: rumqttd never notices a dropped link by
//! itself, so a leaked one would be held for good, and a flood of such
//! clients would shut every honest client out.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fleet_broker::{BrokerConfig, RunningBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

fn connect_packet(client_id: &str) -> Vec<u8> {
    // MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s.
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// Waits until the broker has taken `connections` connections off its
/// listen queue and none is open any more: every one has been handled to
/// its end.
async fn settled(broker: &RunningBroker, connections: u64) {
    let deadline = Instant::now() + T;
    let taken = |b: &RunningBroker| {
        b.metrics.get(|m| &m.accepted)
            + b.metrics.get(|m| &m.over_capacity)
            + b.metrics.get(|m| &m.rate_limited)
    };
    while taken(broker) < connections || broker.metrics.get(|m| &m.live) != 0 {
        assert!(Instant::now() < deadline, "connections never ended");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The CONNACK return code an honest client gets.
async fn connack_code(addr: SocketAddr, client_id: &str) -> u8 {
    let mut s = tokio::time::timeout(T, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(T, s.write_all(&connect_packet(client_id)))
        .await
        .unwrap()
        .unwrap();
    let mut ack = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut ack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ack[0], 0x20, "not a CONNACK: {ack:?}");
    ack[3]
}

#[test]
fn clients_reset_before_their_connack_leave_no_router_slot_behind() {
    let dir = tempfile::tempdir().unwrap();
    let config = BrokerConfig {
        bootstrap_tls_listen: None,
        service_listen: None,
        bootstrap_plain_listen: Some("127.0.0.1:0".parse().unwrap()),
        internal_listen: "127.0.0.1:0".parse().unwrap(),
        certs_dir: dir.path().to_path_buf(),
        // The router holds max_connections + 16 links: 18 here.
        max_connections: 2,
        ..BrokerConfig::default()
    };
    let broker = fleet_broker::start(&config).unwrap();
    let addr = broker.bootstrap_plain_addr.unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Far more vanishing clients than the router has slots. Each sends
        // CONNECT and resets the connection at once (SO_LINGER 0), so the
        // broker's CONNACK write fails for those whose CONNECT it read.
        for i in 0..120 {
            let s = tokio::time::timeout(T, TcpStream::connect(addr))
                .await
                .unwrap()
                .unwrap();
            let mut s = s;
            tokio::time::timeout(T, s.write_all(&connect_packet(&format!("gone{i}"))))
                .await
                .unwrap()
                .unwrap();
            s.set_zero_linger().unwrap();
            drop(s);
            settled(&broker, i + 1).await;
        }
        for i in 0..5 {
            assert_eq!(
                connack_code(addr, &format!("honest{i}")).await,
                0,
                "honest client {i} refused: router slots leaked"
            );
            // It closes on return; its slot is free again once the broker
            // has seen that.
            settled(&broker, 120 + i + 1).await;
        }
    });
    broker.stop();
}
