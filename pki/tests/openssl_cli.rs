//! Checks the PKI's output with the real `openssl` command-line tool, the
//! same way an operator or an external broker would read it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fleet_pki::{chain_to_pem, generate_csr, IssuedCert, Pki, RevokedEntry};
use openssl::asn1::Asn1Integer;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::{CrlStatus, X509Crl};

fn openssl(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    Command::new("openssl")
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("the openssl command-line tool must be installed to run these tests")
}

fn combined(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn device_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

/// CSR mode, end to end: the device makes a CSR, the PKI checks it and issues.
fn issue(pki: &Pki, device_id: &str, service_id: &str) -> IssuedCert {
    let csr = generate_csr(device_id, &device_key()).unwrap();
    let public = Pki::public_key_from_csr(&csr).unwrap();
    pki.issue_device_certificate(device_id, service_id, &public, 30)
        .unwrap()
}

fn write_leaf(dir: &Path, name: &str, issued: &IssuedCert) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, issued.leaf.to_pem().unwrap()).unwrap();
    path
}

#[test]
fn device_certificate_verifies_with_openssl_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(&tmp.path().join("pki")).unwrap();
    let issued = issue(&pki, "dev1", "svcA");
    let leaf = write_leaf(tmp.path(), "leaf.pem", &issued);

    let out = openssl(&[
        &"verify",
        &"-CAfile",
        &pki.root_pem_path(),
        &"-untrusted",
        &pki.service_ca_path("svcA"),
        &leaf,
    ]);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(combined(&out).contains(": OK"), "{}", combined(&out));

    // The chain as a device would present it: leaf first, then its CA.
    let chain = tmp.path().join("chain.pem");
    std::fs::write(&chain, chain_to_pem(&issued.chain).unwrap()).unwrap();
    let out = openssl(&[
        &"verify",
        &"-CAfile",
        &pki.root_pem_path(),
        &"-untrusted",
        &chain,
        &leaf,
    ]);
    assert!(out.status.success(), "{}", combined(&out));

    // With the root alone the leaf must not verify; with another service's CA neither.
    let out = openssl(&[&"verify", &"-CAfile", &pki.root_pem_path(), &leaf]);
    assert!(!out.status.success(), "{}", combined(&out));
    pki.service_ca("svcB").unwrap();
    let out = openssl(&[
        &"verify",
        &"-CAfile",
        &pki.root_pem_path(),
        &"-untrusted",
        &pki.service_ca_path("svcB"),
        &leaf,
    ]);
    assert!(!out.status.success(), "{}", combined(&out));

    let out = openssl(&[
        &"x509",
        &"-in",
        &leaf,
        &"-noout",
        &"-text",
        &"-nameopt",
        &"RFC2253",
    ]);
    assert!(out.status.success(), "{}", combined(&out));
    let text = combined(&out);
    assert!(text.contains("Subject: CN=dev1,O=svcA"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(!text.contains("TLS Web Server Authentication"), "{text}");
    assert!(text.contains("URI:urn:fleetshift:device:dev1"), "{text}");
    assert!(text.contains("URI:urn:fleetshift:service:svcA"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("ecdsa-with-SHA256"), "{text}");
    let serial_line = issued.serial_hex.to_ascii_lowercase();
    let out = openssl(&[&"x509", &"-in", &leaf, &"-noout", &"-serial"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_start_matches("serial=")
            .to_ascii_lowercase(),
        // openssl prints whole octets, so a serial with a leading zero nibble gains a 0.
        if serial_line.len() % 2 == 1 {
            format!("0{serial_line}")
        } else {
            serial_line
        }
    );
}

#[test]
fn service_ca_and_broker_certificates_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(tmp.path()).unwrap();
    pki.service_ca("svcA").unwrap();

    let out = openssl(&[
        &"verify",
        &"-CAfile",
        &pki.root_pem_path(),
        &pki.service_ca_path("svcA"),
    ]);
    assert!(out.status.success(), "{}", combined(&out));
    let out = openssl(&[
        &"verify",
        &"-CAfile",
        &pki.root_pem_path(),
        &"-purpose",
        &"sslserver",
        &pki.broker_cert_path(),
    ]);
    assert!(out.status.success(), "{}", combined(&out));

    let out = openssl(&[
        &"x509",
        &"-in",
        &pki.service_ca_path("svcA"),
        &"-noout",
        &"-text",
    ]);
    let text = combined(&out);
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");

    let out = openssl(&[
        &"x509",
        &"-in",
        &pki.broker_cert_path(),
        &"-noout",
        &"-text",
    ]);
    let text = combined(&out);
    assert!(text.contains("DNS:localhost"), "{text}");
    assert!(text.contains("IP Address:127.0.0.1"), "{text}");
    assert!(text.contains("IP Address:0:0:0:0:0:0:0:1"), "{text}");

    // The signing key's public half is a SubjectPublicKeyInfo the CLI reads.
    let out = openssl(&[
        &"pkey",
        &"-pubin",
        &"-in",
        &pki.signing_pub_path(),
        &"-noout",
    ]);
    assert!(out.status.success(), "{}", combined(&out));
}

#[test]
fn crl_is_signed_and_revokes_with_openssl_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(&tmp.path().join("pki")).unwrap();
    let revoked = issue(&pki, "dev1", "svcA");
    let kept = issue(&pki, "dev2", "svcA");
    let revoked_leaf = write_leaf(tmp.path(), "revoked.pem", &revoked);
    let kept_leaf = write_leaf(tmp.path(), "kept.pem", &kept);

    let entries = [
        RevokedEntry {
            serial_hex: revoked.serial_hex.clone(),
            revoked_at: revoked.not_before + 60,
        },
        // A serial with its top bit set in the first octet checks INTEGER padding.
        RevokedEntry {
            serial_hex: "80".into(),
            revoked_at: 1_700_000_000,
        },
    ];
    let crl_path = pki.write_crl("svcA", 1, &entries, 42).unwrap();
    assert_eq!(crl_path, pki.crl_path("svcA"));

    let out = openssl(&[
        &"crl",
        &"-in",
        &crl_path,
        &"-CAfile",
        &pki.service_ca_path("svcA"),
        &"-noout",
    ]);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(combined(&out).contains("verify OK"), "{}", combined(&out));
    // Another CA's key must not verify it.
    pki.service_ca("svcB").unwrap();
    let out = openssl(&[
        &"crl",
        &"-in",
        &crl_path,
        &"-CAfile",
        &pki.service_ca_path("svcB"),
        &"-noout",
    ]);
    assert!(!combined(&out).contains("verify OK"), "{}", combined(&out));
    // A flipped signature bit must be caught.
    let mut der = X509Crl::from_pem(&std::fs::read(&crl_path).unwrap())
        .unwrap()
        .to_der()
        .unwrap();
    *der.last_mut().unwrap() ^= 0x01;
    let tampered = tmp.path().join("tampered.crl.pem");
    std::fs::write(
        &tampered,
        X509Crl::from_der(&der).unwrap().to_pem().unwrap(),
    )
    .unwrap();
    let out = openssl(&[
        &"crl",
        &"-in",
        &tampered,
        &"-CAfile",
        &pki.service_ca_path("svcA"),
        &"-noout",
    ]);
    assert!(
        combined(&out).contains("verify failure"),
        "{}",
        combined(&out)
    );

    let out = openssl(&[&"crl", &"-in", &crl_path, &"-noout", &"-text"]);
    let text = combined(&out);
    assert!(text.contains("Version 2"), "{text}");
    assert!(
        text.contains("X509v3 CRL Number:") && text.contains("42"),
        "{text}"
    );
    assert!(text.contains("X509v3 Authority Key Identifier"), "{text}");
    assert!(
        text.contains("Issuer: O = svcA, CN = fleetshift service CA svcA"),
        "{text}"
    );

    let verify = |leaf: &Path| {
        openssl(&[
            &"verify",
            &"-crl_check",
            &"-CAfile",
            &pki.root_pem_path(),
            &"-untrusted",
            &pki.service_ca_path("svcA"),
            &"-CRLfile",
            &crl_path,
            &leaf,
        ])
    };
    let out = verify(&revoked_leaf);
    assert!(!out.status.success(), "{}", combined(&out));
    assert!(
        combined(&out).contains("certificate revoked"),
        "{}",
        combined(&out)
    );
    let out = verify(&kept_leaf);
    assert!(out.status.success(), "{}", combined(&out));

    // Parsed back by the library.
    let crl = X509Crl::from_pem(&std::fs::read(&crl_path).unwrap()).unwrap();
    let (ca, _) = pki.service_ca("svcA").unwrap();
    assert!(crl.verify(&ca.public_key().unwrap()).unwrap());
    assert_eq!(crl.get_revoked().map(|r| r.len()), Some(2));
    assert!(matches!(
        crl.get_by_serial(revoked.leaf.serial_number()),
        CrlStatus::Revoked(_)
    ));
    assert!(matches!(
        crl.get_by_serial(kept.leaf.serial_number()),
        CrlStatus::NotRevoked
    ));
    let x80 = Asn1Integer::from_bn(&BigNum::from_u32(0x80).unwrap()).unwrap();
    assert!(matches!(crl.get_by_serial(&x80), CrlStatus::Revoked(_)));
}

#[test]
fn empty_crl_omits_the_revoked_list() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(tmp.path()).unwrap();
    let leaf = issue(&pki, "dev1", "svcA");
    let leaf_path = write_leaf(tmp.path(), "leaf.pem", &leaf);
    let crl_path = pki.write_crl("svcA", 1, &[], 1).unwrap();

    let out = openssl(&[
        &"crl",
        &"-in",
        &crl_path,
        &"-CAfile",
        &pki.service_ca_path("svcA"),
        &"-noout",
        &"-text",
    ]);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(
        combined(&out).contains("No Revoked Certificates"),
        "{}",
        combined(&out)
    );

    let crl = X509Crl::from_pem(&std::fs::read(&crl_path).unwrap()).unwrap();
    assert!(crl.get_revoked().is_none());
    let out = openssl(&[
        &"verify",
        &"-crl_check",
        &"-CAfile",
        &pki.root_pem_path(),
        &"-untrusted",
        &pki.service_ca_path("svcA"),
        &"-CRLfile",
        &crl_path,
        &leaf_path,
    ]);
    assert!(out.status.success(), "{}", combined(&out));
}

/// A service CA rolled over: the successor is a CA of the same service
/// under the root, issues from then on, and each generation has a CRL of
/// its own that `openssl verify -crl_check` reads; the certificates the
/// first one issued stay good until revoked.
#[test]
fn a_rolled_over_service_ca_issues_and_both_generations_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::open_or_create(&tmp.path().join("pki")).unwrap();
    let old = issue(&pki, "dev1", "svcA");
    assert_eq!(old.ca_generation, 1);
    let kept = issue(&pki, "dev3", "svcA");

    let rolled = pki.roll_service_ca("svcA", 7).unwrap();
    assert_eq!(rolled.generation, 2);
    assert_eq!(rolled.cert_path, pki.service_ca_path_of("svcA", 2));
    assert!(rolled.cert_path.ends_with("services/svcA-ca.2.pem"));
    let subject = combined(&openssl(&[
        &"x509",
        &"-in",
        &rolled.cert_path,
        &"-noout",
        &"-subject",
        &"-ext",
        &"basicConstraints",
    ]));
    assert!(subject.contains("O = svcA"), "{subject}");
    assert!(
        subject.contains("CN = fleetshift service CA svcA 2"),
        "{subject}"
    );
    assert!(subject.contains("CA:TRUE, pathlen:0"), "{subject}");
    let out = openssl(&[
        &"verify",
        &"-CAfile",
        &pki.root_pem_path(),
        &rolled.cert_path,
    ]);
    assert!(out.status.success(), "{}", combined(&out));

    let new = issue(&pki, "dev2", "svcA");
    assert_eq!(new.ca_generation, 2);
    assert_eq!(
        new.chain[1].to_der().unwrap(),
        rolled.cert.to_der().unwrap()
    );
    let (old_leaf, new_leaf, kept_leaf) = (
        write_leaf(tmp.path(), "old.pem", &old),
        write_leaf(tmp.path(), "new.pem", &new),
        write_leaf(tmp.path(), "kept.pem", &kept),
    );
    let verify = |leaf: &Path, untrusted: &Path| {
        openssl(&[
            &"verify",
            &"-CAfile",
            &pki.root_pem_path(),
            &"-untrusted",
            &untrusted,
            &leaf,
        ])
    };
    let first_ca = pki.service_ca_path_of("svcA", 1);
    assert!(verify(&new_leaf, &rolled.cert_path).status.success());
    assert!(!verify(&new_leaf, &first_ca).status.success());
    assert!(verify(&old_leaf, &first_ca).status.success());
    assert!(!verify(&old_leaf, &rolled.cert_path).status.success());

    // One CRL per generation, each signed by its own CA.
    let revoked = |c: &IssuedCert| RevokedEntry {
        serial_hex: c.serial_hex.clone(),
        revoked_at: 1_700_000_000,
    };
    let crl1 = pki.write_crl("svcA", 1, &[revoked(&old)], 10).unwrap();
    let crl2 = pki.write_crl("svcA", 2, &[revoked(&new)], 11).unwrap();
    assert_eq!(crl2, pki.crl_path_of("svcA", 2));
    assert!(crl2.ends_with("crl/svcA.2.crl.pem"));
    for (crl, ca, other) in [
        (&crl1, &first_ca, &rolled.cert_path),
        (&crl2, &rolled.cert_path, &first_ca),
    ] {
        let out = openssl(&[&"crl", &"-in", crl, &"-noout", &"-CAfile", ca]);
        assert!(combined(&out).contains("verify OK"), "{}", combined(&out));
        let out = openssl(&[&"crl", &"-in", crl, &"-noout", &"-CAfile", other]);
        assert!(!combined(&out).contains("verify OK"), "{}", combined(&out));
    }
    // Both CAs and both CRLs in one place, as a broker loads them.
    let bundle = tmp.path().join("cas.pem");
    let crls = tmp.path().join("crls.pem");
    let cat = |paths: &[&Path]| -> Vec<u8> {
        paths
            .iter()
            .flat_map(|p| std::fs::read(p).unwrap())
            .collect()
    };
    std::fs::write(
        &bundle,
        cat(&[&pki.root_pem_path(), &first_ca, &rolled.cert_path]),
    )
    .unwrap();
    std::fs::write(&crls, cat(&[&crl1, &crl2])).unwrap();
    let checked = |leaf: &Path| {
        let out = openssl(&[
            &"verify",
            &"-crl_check",
            &"-CAfile",
            &bundle,
            &"-CRLfile",
            &crls,
            &leaf,
        ]);
        (out.status.success(), combined(&out))
    };
    for leaf in [&old_leaf, &new_leaf] {
        let (ok, text) = checked(leaf);
        assert!(!ok && text.contains("revoked"), "{text}");
    }
    let (ok, text) = checked(&kept_leaf);
    assert!(ok, "{text}");

    // Reopened, the successor still issues.
    let pki = Pki::open_or_create(&tmp.path().join("pki")).unwrap();
    assert_eq!(pki.issuing_generation("svcA").unwrap().generation, 2);
    assert_eq!(issue(&pki, "dev4", "svcA").ca_generation, 2);
    let listed: Vec<u32> = pki
        .service_ca_generations("svcA")
        .unwrap()
        .iter()
        .map(|g| g.generation)
        .collect();
    assert_eq!(listed, [1, 2]);
    // Another service is not touched.
    assert_eq!(issue(&pki, "dev5", "svcB").ca_generation, 1);
}

#[test]
fn a_rolled_over_root_is_verified_by_devices_that_pin_either_root() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let pki = Pki::open_or_create(&dir).unwrap();
    let old = issue(&pki, "dev1", "svcA");
    let old_leaf = write_leaf(tmp.path(), "old.pem", &old);
    assert!(pki.roots_to_pin(0).0.is_empty(), "nothing to learn yet");

    let rolled = pki.roll_root().unwrap();
    assert_eq!(rolled.generation, 2);
    assert!(rolled.cert_path.ends_with("root-ca.2.pem"));
    let cross = rolled.cross_path.clone().unwrap();
    assert!(cross.ends_with("root-ca.2.cross.pem"));
    let first_root = pki.root_pem_path();
    let second_root = rolled.cert_path.clone();
    let subject = |path: &Path| {
        let out = openssl(&[&"x509", &"-in", &path, &"-noout", &"-subject", &"-issuer"]);
        combined(&out)
    };
    assert!(
        subject(&second_root).contains("CN = fleetshift root CA 2"),
        "{}",
        subject(&second_root)
    );
    assert!(
        subject(&cross).contains("issuer=CN = fleetshift root CA\n"),
        "{}",
        subject(&cross)
    );

    let verify = |ca_file: &Path, untrusted: Option<&Path>, cert: &Path| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"verify", &"-CAfile", &ca_file];
        if let Some(untrusted) = &untrusted {
            args.extend([&"-untrusted" as &dyn AsRef<std::ffi::OsStr>, untrusted]);
        }
        args.push(&cert);
        let out = openssl(&args);
        (out.status.success(), combined(&out))
    };

    // The broker's certificate comes from the new root, with the
    // cross-certificate after it: either root verifies it.
    assert!(pki.ensure_broker_cert(None).unwrap(), "issued again");
    assert!(!pki.ensure_broker_cert(None).unwrap(), "and only once");
    let broker = std::fs::read(pki.broker_cert_path()).unwrap();
    let certs = openssl::x509::X509::stack_from_pem(&broker).unwrap();
    assert_eq!(certs.len(), 2, "leaf and cross-certificate");
    let broker_leaf = tmp.path().join("broker-leaf.pem");
    std::fs::write(&broker_leaf, certs[0].to_pem().unwrap()).unwrap();
    let (ok, text) = verify(&first_root, Some(&cross), &broker_leaf);
    assert!(ok, "pinning the first root: {text}");
    let (ok, text) = verify(&second_root, None, &broker_leaf);
    assert!(ok, "pinning the second root: {text}");
    let (ok, _) = verify(&first_root, None, &broker_leaf);
    assert!(!ok, "the first root alone does not sign it");

    // A service created now has its CA from the new root; one created
    // before keeps the first root's until it rolls over, and its
    // successor comes from the new root too.
    let new_service = issue(&pki, "dev2", "svcB");
    let new_leaf = write_leaf(tmp.path(), "new.pem", &new_service);
    let svc_b = pki.service_ca_path("svcB");
    let (ok, text) = verify(&second_root, None, &svc_b);
    assert!(ok, "{text}");
    let (ok, text) = verify(&first_root, Some(&cross), &svc_b);
    assert!(ok, "through the cross-certificate: {text}");
    let (ok, _) = verify(&first_root, None, &svc_b);
    assert!(!ok);
    let svc_a = pki.service_ca_path("svcA");
    let (ok, text) = verify(&first_root, None, &svc_a);
    assert!(ok, "{text}");
    let successor = pki.roll_service_ca("svcA", 5).unwrap();
    let (ok, text) = verify(&second_root, None, &successor.cert_path);
    assert!(ok, "{text}");
    let (ok, _) = verify(&first_root, None, &successor.cert_path);
    assert!(!ok);

    // Leaves of both roots, with both roots in one place.
    let both = tmp.path().join("roots.pem");
    let mut pem = std::fs::read(&first_root).unwrap();
    pem.extend(std::fs::read(&second_root).unwrap());
    std::fs::write(&both, pem).unwrap();
    for (leaf, ca) in [(&old_leaf, &svc_a), (&new_leaf, &svc_b)] {
        let (ok, text) = verify(&both, Some(ca), leaf);
        assert!(ok, "{text}");
    }

    // Each root signs its own CRL.
    for (generation, root) in [(1, &first_root), (2, &second_root)] {
        let crl = match generation {
            1 => dir.join("crl/_root.crl.pem"),
            _ => dir.join("crl/_root.2.crl.pem"),
        };
        let out = openssl(&[&"crl", &"-in", &crl, &"-noout", &"-CAfile", root]);
        assert!(combined(&out).contains("verify OK"), "{}", combined(&out));
    }

    // roots.pem: both, newest first, what a device made now is given.
    let bundle = std::fs::read(dir.join(fleet_pki::ROOTS_FILE)).unwrap();
    let mut expected = std::fs::read(&second_root).unwrap();
    expected.extend(std::fs::read(&first_root).unwrap());
    assert_eq!(bundle, expected);

    // Reopened, the new root issues and both are to be pinned, newest first.
    let pki = Pki::open_or_create(&dir).unwrap();
    assert_eq!(
        pki.root_cert().to_der().unwrap(),
        rolled.cert.to_der().unwrap()
    );
    let (pinned, crosses) = pki.roots_to_pin(0);
    assert_eq!(crosses.len(), 2, "the link both ways");
    assert_eq!(
        crosses[0].to_der().unwrap(),
        std::fs::read(&cross)
            .map(|pem| openssl::x509::X509::from_pem(&pem)
                .unwrap()
                .to_der()
                .unwrap())
            .unwrap()
    );
    let pinned: Vec<Vec<u8>> = pinned.iter().map(|c| c.to_der().unwrap()).collect();
    let generations = pki.root_generations().unwrap();
    assert_eq!(
        pinned,
        vec![
            generations[1].cert.to_der().unwrap(),
            generations[0].cert.to_der().unwrap()
        ]
    );
    assert!(!pki.ensure_broker_cert(None).unwrap(), "still good");
    let dev3 = issue(&pki, "dev3", "svcB");
    let dev3_leaf = write_leaf(tmp.path(), "dev3.pem", &dev3);
    let (ok, text) = verify(&second_root, Some(&svc_b), &dev3_leaf);
    assert!(ok, "{text}");

    // Another process with the directory open, loaded before the next
    // roll, cannot roll over what it has not loaded.
    let other = Pki::open_or_create(&dir).unwrap();
    // A second roll: the broker's certificate carries both
    // cross-certificates, so a client that pins any one of the three
    // roots alone verifies it.
    let third = pki.roll_root().unwrap();
    assert_eq!(third.generation, 3);
    let err = other.roll_root().unwrap_err();
    assert!(err.to_string().contains("another process"), "{err}");
    assert!(third.cert_path.exists() && dir.join("root-ca.3.key").exists());
    assert!(pki.ensure_broker_cert(None).unwrap());
    let served =
        openssl::x509::X509::stack_from_pem(&std::fs::read(pki.broker_cert_path()).unwrap())
            .unwrap();
    assert_eq!(served.len(), 3, "leaf and two cross-certificates");
    std::fs::write(&broker_leaf, served[0].to_pem().unwrap()).unwrap();
    let crosses_pem = tmp.path().join("crosses.pem");
    let mut pem = served[1].to_pem().unwrap();
    pem.extend(served[2].to_pem().unwrap());
    std::fs::write(&crosses_pem, pem).unwrap();
    for root in [&first_root, &second_root, &third.cert_path] {
        let (ok, text) = verify(root, Some(&crosses_pem), &broker_leaf);
        assert!(ok, "pinning {}: {text}", root.display());
    }
    let (pinned, crosses) = pki.roots_to_pin(0);
    assert_eq!((pinned.len(), crosses.len()), (3, 4));
    // The back-certificate links the first root to a client that pins
    // only the second.
    let back = dir.join("root-ca.2.back.pem");
    let (ok, text) = verify(&second_root, None, &back);
    assert!(ok, "{text}");
    let (ok, _) = verify(&first_root, None, &back);
    assert!(!ok);
    assert_eq!(
        pinned[0].to_der().unwrap(),
        third.cert.to_der().unwrap(),
        "newest first"
    );
}
