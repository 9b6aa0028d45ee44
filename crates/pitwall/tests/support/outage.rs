//! A test broker behind a proxy the test cuts and restores.

use std::time::Duration;

use tokio::time::timeout;

use super::PATIENCE;

/// A test broker reached only through a TCP proxy that the test can cut and restore: an outage
/// as Pitwall sees it (connections refused and dropped) while the broker keeps its topics.
pub struct Outage {
    up: tokio::sync::watch::Sender<bool>,
    pub proxy_port: u16,
    _broker: tokio::process::Child,
}

impl Outage {
    pub async fn start(binary: &str) -> Outage {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let broker_port = free();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_port = listener.local_addr().unwrap().port();
        // The broker tells clients to connect to the proxy, so every connection goes through it.
        let broker = tokio::process::Command::new(binary)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{broker_port}"),
            ])
            .args([
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{proxy_port}"),
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        timeout(PATIENCE, async {
            while tokio::net::TcpStream::connect(("127.0.0.1", broker_port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the broker did not open its port");
        let (up, watching) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if !*watching.borrow() {
                    continue; // dropped: refused while the outage lasts
                }
                let mut down = watching.clone();
                tokio::spawn(async move {
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await
                    else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Outage {
            up,
            proxy_port,
            _broker: broker,
        }
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}
