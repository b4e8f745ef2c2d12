//! Conformance: a device written in Python from topics.md alone
//! (testkit/python-device) checks the spec's examples, then goes through
//! activation, both update modes, mutual TLS and telemetry, poll and status,
//! a service change with its reconnect and the old certificate refused, the
//! error paths, and a root roll-over (the roots pinned from a reply, a
//! service of the new root), against the real broker and manager. Operator actions
//! go through the admin HTTP API. Needs the venv `scripts/install-deps`
//! creates in target/python-device-venv.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fleet_testkit::Fleet;
use tokio::io::AsyncReadExt;

/// Longest a script may run; it is killed after that.
const FIXTURES_WITHIN: Duration = Duration::from_secs(120);
const SCENARIO_WITHIN: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test kit lives in the workspace")
        .to_path_buf()
}

/// The venv's python, or a failure telling how to make it.
fn python() -> PathBuf {
    let python = repo().join("target/python-device-venv/bin/python");
    assert!(
        python.exists(),
        "no Python device venv at {}: run scripts/install-deps (it creates the venv and \
         installs testkit/python-device/requirements.txt)",
        python.display()
    );
    python
}

struct Run {
    what: String,
    /// None when it was killed at the deadline.
    status: Option<ExitStatus>,
    took: Duration,
    stdout: String,
    stderr: String,
}

impl Run {
    fn passed(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    fn report(&self) -> String {
        let ended = match self.status {
            Some(s) => format!("exited with {s}"),
            None => "killed at its deadline".to_string(),
        };
        format!(
            "==== {} {ended} after {:.1?}\n---- stdout\n{}\n---- stderr\n{}",
            self.what, self.took, self.stdout, self.stderr
        )
    }
}

async fn read_all<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> String {
    let mut bytes = Vec::new();
    if let Some(mut pipe) = pipe {
        let _ = pipe.read_to_end(&mut bytes).await;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs `script` in testkit/python-device with the venv's python, killed
/// after `within`; collects what it printed.
async fn run_script(script: &str, args: Vec<OsString>, cwd: &Path, within: Duration) -> Run {
    let path = repo().join("testkit/python-device").join(script);
    let started = Instant::now();
    let mut child = tokio::process::Command::new(python())
        // -B: no __pycache__ written into the source tree.
        .arg("-B")
        .arg(&path)
        .args(&args)
        .current_dir(cwd)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
    let stdout = tokio::spawn(read_all(child.stdout.take()));
    let stderr = tokio::spawn(read_all(child.stderr.take()));
    let status = match tokio::time::timeout(within, child.wait()).await {
        Ok(status) => Some(status.expect("waiting for the script")),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    };
    let took = started.elapsed();
    // The pipes close when the script ends; bounded all the same.
    let collect = |task: tokio::task::JoinHandle<String>| async move {
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(text)) => text,
            _ => "(output not collected)".to_string(),
        }
    };
    Run {
        what: format!("{script} {}", shown(&args)),
        status,
        took,
        stdout: collect(stdout).await,
        stderr: collect(stderr).await,
    }
}

fn shown(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn python_device_from_the_spec_alone() {
    // Fail at once, before anything starts, if the venv is missing.
    python();
    let fleet = Fleet::start().await.unwrap();
    let work = fleet.dir.path().join("python-device");
    std::fs::create_dir_all(&work).unwrap();

    let fixtures = run_script(
        "verify_fixtures.py",
        vec!["--spec".into(), repo().join("topics.md").into()],
        &work,
        FIXTURES_WITHIN,
    )
    .await;

    let bootstrap = fleet
        .broker
        .bootstrap_tls_addr
        .expect("bootstrap TLS listener");
    let scenario = run_script(
        "scenario.py",
        vec![
            "--admin".into(),
            fleet.admin().into(),
            "--certs".into(),
            fleet.certs_dir().into(),
            "--bootstrap".into(),
            bootstrap.to_string().into(),
            "--service-addr".into(),
            fleet.service_addr().to_string().into(),
            "--work".into(),
            work.join("scenario").into(),
        ],
        &work,
        SCENARIO_WITHIN,
    )
    .await;

    let (passed, failed): (Vec<&Run>, Vec<&Run>) =
        [&fixtures, &scenario].into_iter().partition(|r| r.passed());
    for run in passed {
        println!("{}", run.report());
    }
    assert!(
        failed.is_empty(),
        "the Python device failed:\n{}",
        failed
            .iter()
            .map(|r| r.report())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
