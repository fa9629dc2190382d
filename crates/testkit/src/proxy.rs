//! A corporate-style HTTP proxy on 127.0.0.1 for tests: a `CONNECT
//! host:port` is answered 200 and tunnelled; a request in absolute form
//! (`GET http://host:port/path`) is passed on as it is, with the rest of
//! its connection. It records each connection's first request line and its
//! `Proxy-Authorization`.

use crate::upstream::Shared;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy saw first on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// `CONNECT 127.0.0.1:443 HTTP/1.1`, or `POST http://127.0.0.1:80/x HTTP/1.1`.
    pub line: String,
    pub authorization: Option<String>,
}

#[derive(Debug)]
pub struct TestProxy {
    pub addr: SocketAddr,
    pub opened: Shared<Vec<Opened>>,
}

impl TestProxy {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn opened(&self) -> Vec<Opened> {
        self.opened.lock().expect("lock").clone()
    }
}

pub async fn proxy() -> TestProxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let opened: Shared<Vec<Opened>> = Default::default();
    let log = opened.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(relay(client, log.clone()));
        }
    });
    TestProxy { addr, opened }
}

async fn relay(mut client: TcpStream, log: Shared<Vec<Opened>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte).await {
            Ok(1) if head.len() < 16 * 1024 => head.push(byte[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default().to_string();
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, value)| value.trim().to_string());
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let tunnel = method == "CONNECT";
    let authority = if tunnel {
        target.to_string()
    } else {
        let rest = target.strip_prefix("http://").unwrap_or(target);
        rest.split('/').next().unwrap_or(rest).to_string()
    };
    log.lock().expect("lock").push(Opened {
        line: line.clone(),
        authorization,
    });
    let Ok(mut upstream) = TcpStream::connect(&authority).await else {
        let _ = client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    let forwarded = if tunnel {
        client
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
    } else {
        // (an origin server takes a request in absolute form)
        upstream.write_all(&head).await
    };
    if forwarded.is_ok() {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}
