//! The server-authenticated TLS bootstrap listener.
//!
//! rumqttd's client-certificate check is one compile-time switch for every
//! TLS listener, so a listener where devices without a certificate connect
//! over TLS cannot be one of rumqttd's. This one terminates TLS itself (the
//! broker certificate from `certs/`, TLS 1.2 or later, no client
//! certificate), with a handshake timeout and a connection limit, and
//! relays the MQTT bytes to the plain bootstrap listener on loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslVersion};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_openssl::SslStream;
use tracing::{debug, warn};

use crate::BrokerError;

/// Builds the acceptor once; every handshake shares it.
pub(crate) fn acceptor(certs_dir: &Path) -> Result<SslAcceptor, BrokerError> {
    let tls = |e: openssl::error::ErrorStack| BrokerError::Tls(e.to_string());
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).map_err(tls)?;
    builder
        .set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(tls)?;
    let cert = certs_dir.join("broker.pem");
    let key = certs_dir.join("broker.key");
    for p in [&cert, &key] {
        if !p.exists() {
            return Err(BrokerError::MissingFile(p.display().to_string()));
        }
    }
    builder.set_certificate_chain_file(&cert).map_err(tls)?;
    builder
        .set_private_key_file(&key, openssl::ssl::SslFiletype::PEM)
        .map_err(tls)?;
    builder.check_private_key().map_err(tls)?;
    Ok(builder.build())
}

/// Accepts TLS connections on `listener` and relays each to `upstream`.
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: SslAcceptor,
    upstream: SocketAddr,
    handshake_timeout: Duration,
    max_connections: usize,
) {
    let acceptor = Arc::new(acceptor);
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(err) => {
                warn!(error = %err, "bootstrap TLS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, "bootstrap TLS connection refused: connection limit reached");
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(err) = relay(stream, &acceptor, upstream, handshake_timeout).await {
                debug!(%peer, error = %err, "bootstrap TLS connection ended");
            }
        });
    }
}

async fn relay(
    stream: TcpStream,
    acceptor: &SslAcceptor,
    upstream: SocketAddr,
    handshake_timeout: Duration,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let ssl = Ssl::new(acceptor.context()).map_err(std::io::Error::other)?;
    let mut tls = SslStream::new(ssl, stream).map_err(std::io::Error::other)?;
    tokio::time::timeout(handshake_timeout, Pin::new(&mut tls).accept())
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
        .map_err(std::io::Error::other)?;
    let mut inner = TcpStream::connect(upstream).await?;
    let _ = inner.set_nodelay(true);
    tokio::io::copy_bidirectional(&mut tls, &mut inner).await?;
    Ok(())
}
