//! What the exchange tests share: a real mosquitto on a port the test picks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gateway_booking::{Schedule, ScheduleSpec};
use gateway_mqtt::Broker;
use gateway_regional::Connection;

/// A mosquitto on 127.0.0.1:`port`, killed when dropped.
pub struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let binary = binary("mosquitto", "mosquitto");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not listen on 127.0.0.1:{port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// Publishes `payload` on `topic` (QoS 1) with `mosquitto_pub`, as a client of its own.
    pub fn publish_raw(&self, topic: &str, payload: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("payload");
        std::fs::write(&file, payload).unwrap();
        let binary = binary("mosquitto_pub", "mosquitto-clients");
        let status = Command::new(binary)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-q",
                "1",
                "-t",
                topic,
                "-f",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_pub failed: {status}");
    }

    pub fn connection(&self, me: &str) -> Connection {
        let url = format!("mqtt://127.0.0.1:{}", self.port).parse().unwrap();
        Connection {
            client_id: gateway_id::Id::parse(me, "node id").unwrap(),
            broker: Broker::new(&url, None).unwrap(),
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CT schedule `ct-1` at station `CT01`.
pub fn ct() -> Schedule {
    Schedule::new(&ScheduleSpec {
        id: "ct-1".into(),
        modality: "CT".into(),
        station_ae: "CT01".into(),
        ..ScheduleSpec::default()
    })
    .unwrap()
}

/// The installed `name` (in `/usr/sbin` or `/usr/bin`); missing: a failure naming `package`.
fn binary(name: &str, package: &str) -> std::path::PathBuf {
    ["/usr/sbin", "/usr/bin"]
        .into_iter()
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: apt-get install {package} (this test needs a real broker)"
            )
        })
}
