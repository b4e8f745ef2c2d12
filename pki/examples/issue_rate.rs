//! Device certificate issuance rate, single-threaded, in three shapes:
//!
//! - `issue`: `issue_device_certificate` from a public key generated
//!   beforehand, the CA side alone;
//! - `csr+issue`: `public_key_from_csr` then issue, what the manager does for
//!   an update in CSR mode (the CSRs are generated beforehand);
//! - `keygen+issue`: a fresh P-256 key then issue, what the manager does for
//!   an update in manager-generated-key mode (without sealing the key).
//!
//! Each shape runs N iterations (first argument, default 2000), five times;
//! the output gives every round and the median in certificates per second.
//! Build with `--release`: `cargo run --release -p fleet-pki --example issue_rate -- 2000`.
//! The last lines are `median <shape> <per second>`, for scripts.

use std::time::Instant;

use fleet_pki::Pki;
use openssl::pkey::{PKey, Public};

const ROUNDS: usize = 5;
const SERVICE: &str = "bench";
const LIFETIME_DAYS: u32 = 90;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|_| format!("N must be a count, got {arg:?}"))?,
        None => 2000,
    };
    if n == 0 {
        return Err("N must be at least 1".into());
    }
    let dir = tempfile::tempdir()?;
    let pki = Pki::open_or_create(dir.path())?;
    // Create the service CA now so no round pays for it.
    pki.service_ca(SERVICE)?;

    let ids: Vec<String> = (0..n).map(|i| format!("dev-{i:05}")).collect();
    // Distinct keys, as in a fleet; OpenSSL caches nothing per key that matters here.
    let publics = (0..n)
        .map(|_| {
            let key = fleet_protocol::crypto::generate_p256()?;
            public_half(&key)
        })
        .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
    let csrs = ids
        .iter()
        .map(|id| {
            let key = fleet_protocol::crypto::generate_p256()?;
            Ok(fleet_pki::generate_csr(id, &key)?)
        })
        .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;

    println!("issue_rate: N = {n}, {ROUNDS} rounds per shape, single thread");
    let mut medians = Vec::new();

    medians.push((
        "issue",
        measure("issue", n, |i| {
            pki.issue_device_certificate(&ids[i], SERVICE, &publics[i], LIFETIME_DAYS)?;
            Ok(())
        })?,
    ));
    medians.push((
        "csr+issue",
        measure("csr+issue", n, |i| {
            let public = Pki::public_key_from_csr(&csrs[i])?;
            pki.issue_device_certificate(&ids[i], SERVICE, &public, LIFETIME_DAYS)?;
            Ok(())
        })?,
    ));
    medians.push((
        "keygen+issue",
        measure("keygen+issue", n, |i| {
            let key = fleet_protocol::crypto::generate_p256()?;
            let public = public_half(&key)?;
            pki.issue_device_certificate(&ids[i], SERVICE, &public, LIFETIME_DAYS)?;
            Ok(())
        })?,
    ));

    for (shape, per_sec) in medians {
        println!("median {shape} {per_sec:.0}");
    }
    Ok(())
}

/// Runs `op` for `0..n`, `ROUNDS` times; prints each round and returns the
/// median rate in operations per second.
fn measure(
    shape: &str,
    n: usize,
    mut op: impl FnMut(usize) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut rates = Vec::with_capacity(ROUNDS);
    for round in 1..=ROUNDS {
        let started = Instant::now();
        for i in 0..n {
            op(i)?;
        }
        let secs = started.elapsed().as_secs_f64();
        let rate = n as f64 / secs;
        println!(
            "{shape:<13} round {round}: {n} in {secs:.3} s = {rate:.0}/s ({:.1} us each)",
            secs * 1e6 / n as f64
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[ROUNDS / 2])
}

/// The public half as the manager holds it: a `PKey<Public>`.
fn public_half(
    key: &PKey<openssl::pkey::Private>,
) -> Result<PKey<Public>, Box<dyn std::error::Error>> {
    Ok(PKey::public_key_from_der(&key.public_key_to_der()?)?)
}
