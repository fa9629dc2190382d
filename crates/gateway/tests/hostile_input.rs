//! Hostile request heads at the gateway's socket: valid heads damaged byte
//! by byte, and well-formed heads whose paths try to climb out of a route's
//! `path_prefix` (dot segments plain and encoded, doubled and encoded
//! slashes, backslashes, absolute-form targets). Each case is written raw
//! to a TCP connection. The gateway must answer with an HTTP status or close
//! the connection, never relay outside the prefix (the upstream echoes the
//! path it received), and keep serving. `TOLLGATE_FUZZ_CASES` cases per
//! property (256 by default; `bench/fuzz.sh` runs more).

mod common;
#[path = "../../testkit/hostile_input.rs"]
mod hostile;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Everything under /public/ goes to the upstream; nothing else has a route.
fn config(upstream: std::net::SocketAddr) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naccess_log = \"off\"\n\n[[gateway.route]]\npath_prefix = \"/public/\"\nupstream = \"http://{upstream}\"\n\n[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 1000000000\nrefill = \"1000000000/s\"\n"
    )
}

/// Write `head` raw (and a blank line: a head whose end was damaged away is
/// complete again, so most cases get an answer rather than a wait), then
/// read what comes back: until the gateway closes, or 300 ms pass without a
/// byte. None if nothing came within a second.
async fn exchange(addr: std::net::SocketAddr, head: &[u8]) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The gateway may close before reading it all: a failed write is an answer too.
    if stream.write_all(head).await.is_err() || stream.write_all(b"\r\n\r\n").await.is_err() {
        return None;
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 16384];
    let mut wait = Duration::from_secs(1);
    while let Ok(Ok(n)) = tokio::time::timeout(wait, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        wait = Duration::from_millis(300);
    }
    (!answer.is_empty()).then(|| String::from_utf8_lossy(&answer).into_owned())
}

/// An answer is one HTTP/1.1 status line first; a relayed one echoes a path
/// under /public/.
fn check(head: &str, answer: Option<String>) -> Result<(), TestCaseError> {
    let Some(answer) = answer else {
        return Ok(());
    };
    let status = answer.get(9..12).unwrap_or("");
    prop_assert!(
        answer.starts_with("HTTP/1.1 ") && status.bytes().all(|b| b.is_ascii_digit()),
        "not an HTTP answer to {head:?}: {answer:?}"
    );
    if let Some((_, body)) = answer.split_once("\r\n\r\n") {
        if let Some(path) = body.strip_prefix("ok ") {
            prop_assert!(
                path.starts_with("/public/"),
                "{head:?} reached the upstream as {path:?}"
            );
        }
    }
    Ok(())
}

fn climbing_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just(".."),
        Just("."),
        Just("%2e%2e"),
        Just("%2E."),
        Just(".%2e"),
        Just(""),
        Just("%2f"),
        Just("%2F.."),
        Just("\\.."),
        Just("private"),
        Just("a"),
        Just("%00"),
        Just("%"),
        Just("%zz"),
        Just(";"),
        Just("?x=/../"),
        Just("#"),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|pieces| format!("/public/{}", pieces.join("/")))
}

#[test]
fn hostile_heads_get_an_http_answer_and_never_leave_the_prefix() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let (up, gw) = runtime.block_on(async {
        let up = upstream().await;
        let gw = start(&config(up.addr)).await;
        (up, gw)
    });
    let addr = gw.proxy;

    // Valid heads, damaged.
    const HEAD: &str = "GET /public/a?b=c HTTP/1.1\r\nHost: api.example\r\nx-tenant-id: acme\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let special = &[
        ' ', '\r', '\n', ':', '/', '%', '.', '\0', '\\', '?', '#', '\t', '\u{7f}', 'é',
    ];
    let damaged = prop::collection::vec(hostile::edit(special), 1..8)
        .prop_map(|edits| hostile::damaged(HEAD, &edits));
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let relayed = std::sync::atomic::AtomicUsize::new(0);
    let tally = |answer: &Option<String>| {
        if let Some(a) = answer {
            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if a.contains("\r\n\r\nok /") {
                relayed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    let mut runner = TestRunner::new(hostile::cases());
    runner
        .run(&damaged, |head| {
            let answer = runtime.block_on(exchange(addr, head.as_bytes()));
            tally(&answer);
            check(&head, answer)
        })
        .expect("damaged heads");

    // Well-formed heads whose paths climb, in origin and absolute form.
    let climbing = (climbing_path(), any::<bool>()).prop_map(|(path, absolute)| {
        let target = if absolute { format!("http://evil.example{path}") } else { path };
        format!("GET {target} HTTP/1.1\r\nHost: api.example\r\nx-tenant-id: acme\r\nconnection: close\r\n\r\n")
    });
    let mut runner = TestRunner::new(hostile::cases());
    runner
        .run(&climbing, |head| {
            let answer = runtime.block_on(exchange(addr, head.as_bytes()));
            tally(&answer);
            check(&head, answer)
        })
        .expect("climbing paths");
    // The cases reached both the gateway's refusals and the upstream.
    let (answered, relayed) = (answered.into_inner(), relayed.into_inner());
    let cases = 2 * hostile::cases().cases as usize;
    assert!(
        answered * 10 >= cases * 9,
        "only {answered} of {cases} cases answered"
    );
    assert!(
        relayed > 0 && relayed < answered,
        "{relayed} of {answered} relayed"
    );

    // Still serving, and the upstream saw traffic (the cases reached it).
    runtime.block_on(async {
        let answer = exchange(
            addr,
            b"GET /public/still HTTP/1.1\r\nHost: x\r\nx-tenant-id: t\r\nconnection: close\r\n\r\n",
        )
        .await
        .expect("an answer");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.ends_with("ok /public/still body=0 xff=127.0.0.1"),
            "{answer}"
        );
    });
    assert!(up.received() > 1, "no case reached the upstream");
}
