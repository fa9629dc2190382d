//! `tollgate serve` over TLS and HTTP/2, on real sockets with a test CA:
//! curl and Python's httpx (with h2) as the clients, the certificate
//! replaced while requests run.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tollgate_testkit::tls::TestCa;

mod common;

/// One bucket of 4 per tenant, refilled once an hour: exact for a test.
const LIMIT: &str = "[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 4\nrefill = \"1/h\"\n";

fn tls_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let text = format!(
        "[gateway]\ntls = {{ cert = \"server.crt\", key = \"server.key\" }}\nwatch_interval = \"100ms\"\n{extra}\n{LIMIT}"
    );
    let path = dir.join("tls.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-tls-{}-{}",
        std::process::id(),
        tollgate_testkit::unique_prefix(name)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// curl's status code and HTTP version for one request, and the response
/// headers it printed.
fn curl(args: &[&str], url: &str, tenant: &str) -> (String, String, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-S",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .args(["-H", &format!("x-tenant-id: {tenant}")])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let last = text.lines().last().unwrap_or_default().to_string();
    let (code, version) = last.split_once(' ').unwrap_or(("", ""));
    (
        code.to_string(),
        version.to_string(),
        format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// TLS with HTTP/2 by ALPN, and HTTP/1.1 on the same port, count against
/// one bucket; the 429 over HTTP/2 carries the same headers; Python's httpx
/// speaks HTTP/2 to it as well.
#[test]
fn tls_http2_and_http1_share_the_limits() {
    let ca = TestCa::new();
    let dir = temp_dir("limits");
    ca.write_server_files(&dir, "server");
    let gateway = common::serve(&tls_config(&dir, ""));
    let url = format!("https://{}/v1/jobs", gateway.proxy);
    let ca_file = ca.path.to_str().expect("utf8");

    let h2 = ["--cacert", ca_file, "--http2"];
    let h1 = ["--cacert", ca_file, "--http1.1"];
    let (code, version, headers) = curl(&h2, &url, "acme");
    assert_eq!((code.as_str(), version.as_str()), ("200", "2"), "{headers}");
    let (code, version, headers) = curl(&h1, &url, "acme");
    assert_eq!(
        (code.as_str(), version.as_str()),
        ("200", "1.1"),
        "{headers}"
    );
    let (code, version, headers) = curl(&h2, &url, "acme");
    assert_eq!((code.as_str(), version.as_str()), ("200", "2"), "{headers}");
    assert!(headers.contains("ratelimit: \"tenant\";r=1"), "{headers}");

    // The fourth unit over Python's httpx (HTTP/2), then the bucket is empty.
    let script = r#"
import sys, httpx
with httpx.Client(http2=True, verify=sys.argv[1]) as c:
    for _ in range(2):
        r = c.get(sys.argv[2], headers={"x-tenant-id": "acme"})
        print(r.http_version, r.status_code, r.headers.get("retry-after", "-"))
"#;
    let out = Command::new("python3")
        .args(["-c", script, ca_file, &url])
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines[0], "HTTP/2 200 -");
    assert!(lines[1].starts_with("HTTP/2 429 "), "{text}");
    assert_ne!(lines[1], "HTTP/2 429 -", "a Retry-After over HTTP/2");

    let (code, version, headers) = curl(&h1, &url, "acme");
    assert_eq!(
        (code.as_str(), version.as_str()),
        ("429", "1.1"),
        "{headers}"
    );
    assert!(
        headers.contains("content-type: application/problem+json"),
        "{headers}"
    );
    // Another tenant is untouched; cleartext is not served on a TLS port.
    assert_eq!(curl(&h2, &url, "other").0, "200");
    let plain = curl(
        &["--http1.1", "-m", "5"],
        &format!("http://{}/v1/jobs", gateway.proxy),
        "x",
    );
    assert_ne!(plain.0, "200", "{}", plain.2);
}

/// On a cleartext port a client that opens with HTTP/2's preface (h2c by
/// prior knowledge) gets HTTP/2; others HTTP/1.1; one bucket.
#[test]
fn cleartext_speaks_http2_by_prior_knowledge() {
    let dir = temp_dir("h2c");
    let config = dir.join("h2c.toml");
    std::fs::write(&config, LIMIT).expect("write config");
    let gateway = common::serve(&config);
    let url = format!("http://{}/v1/jobs", gateway.proxy);
    let h2c = ["--http2-prior-knowledge"];
    let mut seen = Vec::new();
    for args in [&h2c[..], &[], &h2c[..], &[], &h2c[..]] {
        let (code, version, _) = curl(args, &url, "acme");
        seen.push(format!("{code} {version}"));
    }
    assert_eq!(seen, ["200 2", "200 1.1", "200 2", "200 1.1", "429 2"]);
}

/// The certificate's files are replaced (a renewal by a new CA) while
/// requests run on new connections and on one kept-alive HTTP/2 connection:
/// no request fails, the kept connection carries on, and new handshakes
/// present the new certificate, without a restart. A broken pair is
/// refused and the current certificate keeps serving.
#[test]
fn a_renewed_certificate_is_served_without_a_failed_request() {
    let (old_ca, new_ca) = (TestCa::new(), TestCa::new());
    let dir = temp_dir("renew");
    old_ca.write_server_files(&dir, "server");
    // A tenant per request: only TLS can fail a request here.
    let gateway = common::serve(&tls_config(&dir, ""));
    let both = dir.join("both.pem");
    std::fs::write(&both, format!("{}{}", old_ca.pem, new_ca.pem)).expect("bundle");
    let url = format!("https://{}/v1/jobs", gateway.proxy);

    // A kept-alive HTTP/2 connection before, during and after the renewal,
    // and new connections all along: Python prints a line per request.
    let script = r#"
import sys, time, httpx
kept = httpx.Client(http2=True, verify=sys.argv[1])
failures, n = [], 0
deadline = time.time() + float(sys.argv[3])
while time.time() < deadline:
    for client in (kept, None):
        try:
            if client is None:
                with httpx.Client(http2=True, verify=sys.argv[1]) as fresh:
                    r = fresh.get(sys.argv[2], headers={"x-tenant-id": "t%d" % n})
            else:
                r = client.get(sys.argv[2], headers={"x-tenant-id": "t%d" % n})
            if r.status_code != 200 or r.http_version != "HTTP/2":
                failures.append("%s %s" % (r.http_version, r.status_code))
        except Exception as e:
            failures.append(repr(e))
        n += 1
print(n, len(failures), failures[:3])
"#;
    let load = Command::new("python3")
        .args(["-c", script, both.to_str().expect("utf8"), &url, "3"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    std::thread::sleep(Duration::from_millis(800));
    // A broken key first: refused, the current certificate keeps serving.
    std::fs::write(dir.join("server.key"), "not a key").expect("write");
    std::thread::sleep(Duration::from_millis(400));
    new_ca.write_server_files(&dir, "server");
    let out = load.wait_with_output().expect("load finished");
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    let fields: Vec<&str> = summary.split_whitespace().collect();
    assert!(
        fields.len() >= 2 && fields[1] == "0",
        "requests failed across the renewal: {summary}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        fields[0].parse::<u32>().unwrap_or(0) >= 20,
        "too few requests: {summary}"
    );

    // New handshakes present the new certificate: a client trusting only
    // the new CA gets through, one trusting only the old one no longer does.
    let new_only = ["--cacert", new_ca.path.to_str().expect("utf8"), "--http2"];
    let old_only = ["--cacert", old_ca.path.to_str().expect("utf8"), "--http2"];
    let started = Instant::now();
    while curl(&new_only, &url, "after").0 != "200" {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new certificate was never served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, _, detail) = curl(&old_only, &url, "after");
    assert_eq!(code, "000", "the old certificate is gone: {detail}");
}

/// A certificate that cannot be loaded stops `serve` (and `tollgate
/// check`) with a message naming the file.
#[test]
fn a_missing_or_mismatched_certificate_is_a_clear_error() {
    let (ca, other) = (TestCa::new(), TestCa::new());
    let dir = temp_dir("bad");
    let config = tls_config(&dir, "");
    let out = common::serve_command(&config).output().expect("serve runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("tls cert") && text.contains("server.crt"),
        "{text}"
    );

    // A key that belongs to another certificate.
    ca.write_server_files(&dir, "server");
    let (_, other_key) = other.write_server_files(&dir, "other");
    std::fs::rename(other_key, dir.join("server.key")).expect("swap the key");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", config.to_str().expect("utf8")])
        .output()
        .expect("check runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("does not belong to the certificate"),
        "{text}"
    );
}
