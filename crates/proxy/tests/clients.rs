//! The proxy as its users call it: with clients others wrote (Python's
//! `requests` and `httpx`, curl, Node's `fetch`), in alias mode and through
//! `HTTP_PROXY`, in front of an HTTPS upstream whose certificate comes from
//! a test CA that only the proxy's `ca_file` trusts. Real time, real sockets.

mod common;

use common::{bucket, start_at, start_from, start_until, upstream};
use tollgate_store::TokioClock;
use tollgate_testkit::upstream::{ok, scripted, scripted_tls, Answer};

/// Run a program; its stdout (trimmed). A missing program fails the test
/// with its name: CI installs them (scripts/test.sh).
async fn output(program: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = tokio::process::Command::new(program)
        .args(args)
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("NO_PROXY")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program} could not run ({e}); scripts/test.sh installs it"));
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || program == "curl",
        "{program} {args:?} failed: {stdout}\n{stderr}"
    );
    stdout
}

/// curl, printing only what `format` (`-w`) asks of the answer.
async fn curl(format: &str, args: &[&str]) -> String {
    let mut all = vec!["-s", "-o", "/dev/null", "-w", format];
    all.extend_from_slice(args);
    output("curl", &all, &[]).await
}

const PYTHON_ALIAS: &str = r#"
import sys, requests, httpx
base = sys.argv[1]
r = requests.get(base + "/crm/v1/contacts?limit=2", headers={"Tollgate-Priority": "high", "Tollgate-Workflow": "enrich"})
print("requests", r.status_code, r.headers["Tollgate-Attempts"], r.json()["ok"])
r = httpx.post(base + "/crm/v1/contacts", json={"email": "a@example.com"}, headers={"Idempotency-Key": "k-1"})
print("httpx", r.status_code, r.headers["tollgate-attempts"])
r = requests.get(base + "/crm/v1/x", headers={"Tollgate-Max-Wait": "later"})
print("bad", r.status_code, r.headers["Content-Type"], r.json()["detail"].split(":")[0])
"#;

const PYTHON_FORWARD: &str = r#"
import sys, os, requests, httpx
plain = sys.argv[1]
r = requests.get(plain + "/v1/forward")   # HTTP_PROXY from the environment
print("requests", r.status_code, r.headers["Tollgate-Attempts"])
with httpx.Client(proxy=os.environ["HTTP_PROXY"]) as c:
    r = c.get(plain + "/v1/forward")
    print("httpx", r.status_code)
    r = c.get("http://example.com/")
    print("other", r.status_code, r.json()["title"])
"#;

const NODE_FETCH: &str = r#"
const base = process.argv[1];
fetch(base + "/crm/v1/node", { headers: { "Tollgate-Priority": "low" } })
  .then(async (r) => console.log("fetch", r.status, r.headers.get("tollgate-attempts"), (await r.json()).ok))
  .catch((e) => { console.error(e); process.exit(1); });
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_curl_and_node_call_an_https_vendor_through_the_proxy() {
    let (vendor, ca) = scripted_tls(|_, _| ok()).await;
    let plain = scripted(|_, _| ok()).await;
    // The vendor over HTTPS: only `ca_file` makes the proxy trust it.
    let config = format!(
        "[[upstream]]\nname = \"crm\"\nbase_url = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\nheaders = {{ authorization = \"Bearer vendor-key\" }}\n{}\n{}",
        vendor.addr.port(),
        ca.path.display(),
        bucket("api", 100, "100/s"),
        upstream("plain", plain.addr, &bucket("api", 100, "100/s")),
    );
    let proxy = start_at(&config, TokioClock::system()).await;
    let base = format!("http://{}", proxy.addr);
    let proxy_url = base.clone();

    let alias = output("python3", &["-c", PYTHON_ALIAS, &base], &[]).await;
    assert_eq!(
        alias.lines().collect::<Vec<_>>(),
        [
            "requests 200 1 True",
            "httpx 200 1",
            "bad 400 application/problem+json header Tollgate-Max-Wait",
        ],
        "{alias}"
    );
    let plain_base = format!("http://{}", plain.addr);
    let forward = output(
        "python3",
        &["-c", PYTHON_FORWARD, &plain_base],
        &[("HTTP_PROXY", &proxy_url), ("http_proxy", &proxy_url)],
    )
    .await;
    assert_eq!(
        forward.lines().collect::<Vec<_>>(),
        [
            "requests 200 1",
            "httpx 200",
            "other 403 Host not configured"
        ],
        "{forward}"
    );

    let curl_alias = curl("%{http_code}", &[&format!("{base}/crm/v1/curl")]).await;
    assert_eq!(curl_alias, "200");
    let curl_forward = curl(
        "%{http_code}",
        &["-x", &proxy_url, &format!("{plain_base}/v1/curl")],
    )
    .await;
    assert_eq!(curl_forward, "200");
    // HTTPS_PROXY without interception: the CONNECT is refused, naming the host.
    let tunnel = curl(
        "%{http_connect}",
        &["-x", &proxy_url, "https://example.com/"],
    )
    .await;
    assert_eq!(tunnel, "403");

    let node = output("node", &["-e", NODE_FETCH, &base], &[]).await;
    assert_eq!(node, "fetch 200 1 true");

    // The vendor saw its key, over TLS, and nothing of tollgate's headers.
    let seen = vendor.seen.lock().expect("lock").clone();
    assert_eq!(
        seen.len(),
        4,
        "{:?}",
        seen.iter().map(|s| &s.path).collect::<Vec<_>>()
    );
    for s in &seen {
        assert_eq!(s.authorization.as_deref(), Some("Bearer vendor-key"));
        assert!(s.headers.iter().all(|(n, _)| !n.starts_with("tollgate-")));
    }
    let post = seen.iter().find(|s| s.method == "POST").expect("the POST");
    assert_eq!(&post.body[..], br#"{"email":"a@example.com"}"#);
    assert_eq!(post.idempotency_key, "k-1");
    assert_eq!(plain.seen("/v1/forward").len(), 2);
    assert_eq!(plain.seen("/v1/curl").len(), 1);
}

/// A fresh local CA for a test (its directory, its certificate), and the
/// `[[upstream]]` of `crm`: the HTTPS vendor at `vendor`, whose certificate
/// `vendor_ca` signed, intercepted; `extra` adds lines (limits, headers).
fn intercepted_crm(
    test: &str,
    vendor: std::net::SocketAddr,
    vendor_ca: &std::path::Path,
    extra: &str,
) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-{test}-{}",
        tollgate_testkit::unique_prefix("ca")
    ));
    let local_ca = tollgate_proxy::intercept::init(&dir, false).expect("ca init");
    let upstream = format!(
        "[[upstream]]\nname = \"crm\"\nbase_url = \"https://127.0.0.1:{}\"\nintercept = true\nca_file = \"{}\"\n{extra}",
        vendor.port(),
        vendor_ca.display(),
    );
    (dir, local_ca, upstream)
}

const PYTHON_TUNNEL: &str = r#"
import os, sys, time, requests, httpx
vendor, proxy, ca = sys.argv[1], sys.argv[2], sys.argv[3]
# requests: HTTPS_PROXY and REQUESTS_CA_BUNDLE from the environment
r = requests.get(vendor + "/v1/tunnel/requests", headers={"Tollgate-Priority": "high"})
print("requests", r.status_code, r.headers["Tollgate-Attempts"], r.json()["ok"])
with httpx.Client(proxy=proxy, verify=ca) as c:
    started = time.monotonic()
    codes = [c.get(vendor + "/v1/tunnel/httpx/%d" % i).status_code for i in range(3)]
    print("httpx", codes, "paced" if time.monotonic() - started >= 0.35 else "not paced")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_tunnels_are_intercepted_with_the_local_ca_and_paced() {
    let (vendor, vendor_ca) = scripted_tls(|_, _| ok()).await;
    let (dir, local_ca, upstream) = intercepted_crm(
        "intercept",
        vendor.addr,
        &vendor_ca.path,
        &format!(
            "headers = {{ authorization = \"Bearer vendor-key\" }}\n{}",
            // One call at once, then 5 a second: three calls take 0.4 s.
            bucket("api", 1, "5/s")
        ),
    );
    let config = format!(
        "[proxy]\naccess_log = \"off\"\nca_dir = \"{}\"\n{upstream}",
        dir.display()
    );
    let proxy = start_at(&config, TokioClock::system()).await;
    let proxy_url = format!("http://{}", proxy.addr);
    let vendor_url = format!("https://127.0.0.1:{}", vendor.addr.port());
    let ca = local_ca.display().to_string();
    let python = output(
        "python3",
        &["-c", PYTHON_TUNNEL, &vendor_url, &proxy_url, &ca],
        &[
            ("HTTPS_PROXY", &proxy_url),
            ("https_proxy", &proxy_url),
            ("REQUESTS_CA_BUNDLE", &ca),
        ],
    )
    .await;
    assert_eq!(
        python.lines().collect::<Vec<_>>(),
        ["requests 200 1 True", "httpx [200, 200, 200] paced"],
        "{python}"
    );
    let trusted = curl(
        "%{http_code}",
        &[
            "-x",
            &proxy_url,
            "--cacert",
            &ca,
            &format!("{vendor_url}/v1/tunnel/curl"),
        ],
    )
    .await;
    assert_eq!(trusted, "200");
    // Without trusting the local CA, the client refuses the tunnel's certificate.
    let untrusted = curl(
        "%{http_code}",
        &[
            "-x",
            &proxy_url,
            &format!("{vendor_url}/v1/tunnel/untrusted"),
        ],
    )
    .await;
    assert_eq!(untrusted, "000");
    let seen = vendor.seen.lock().expect("lock").clone();
    assert_eq!(
        seen.len(),
        5,
        "{:?}",
        seen.iter().map(|s| &s.path).collect::<Vec<_>>()
    );
    for s in &seen {
        assert_eq!(s.authorization.as_deref(), Some("Bearer vendor-key"));
        assert!(s
            .headers
            .iter()
            .all(|(n, _)| !n.starts_with("tollgate-") && n != "proxy-authorization"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

const PYTHON_ROTATION: &str = r#"
import sys, httpx, urllib.request
vendor, proxy, ca, config_path, new_config, admin = sys.argv[1:7]
with httpx.Client(proxy=proxy, verify=ca) as c:
    before = c.get(vendor + "/v1/rotate/before").status_code
    with open(config_path, "w") as f:
        f.write(new_config)
    urllib.request.urlopen(urllib.request.Request(admin + "/v1/reload", method="POST")).read()
    # The same client, the same tunnel: its token is no longer the client's.
    after = c.get(vendor + "/v1/rotate/after").status_code
    print(before, after)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_token_changed_by_a_reload_no_longer_opens_its_tunnel() {
    let (vendor, vendor_ca) = scripted_tls(|_, _| ok()).await;
    let (dir, local_ca, upstream) = intercepted_crm(
        "rotation",
        vendor.addr,
        &vendor_ca.path,
        &bucket("api", 100, "100/s"),
    );
    std::env::set_var("TOLLGATE_TEST_ROTATE_OLD", "old-token");
    std::env::set_var("TOLLGATE_TEST_ROTATE_NEW", "new-token");
    let config = |token_env: &str| {
        format!(
            "[proxy]\naccess_log = \"off\"\nca_dir = \"{}\"\n[[proxy.client]]\nname = \"sync\"\ntoken_env = \"{token_env}\"\n{upstream}",
            dir.display()
        )
    };
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config("TOLLGATE_TEST_ROTATE_OLD")).expect("config");
    let proxy = start_from(
        tollgate_proxy::Source::File(path.clone()),
        TokioClock::system(),
    )
    .await;
    let python = output(
        "python3",
        &[
            "-c",
            PYTHON_ROTATION,
            &format!("https://127.0.0.1:{}", vendor.addr.port()),
            &format!("http://sync:old-token@{}", proxy.addr),
            &local_ca.display().to_string(),
            &path.display().to_string(),
            &config("TOLLGATE_TEST_ROTATE_NEW"),
            &format!("http://{}", proxy.admin),
        ],
        &[],
    )
    .await;
    assert_eq!(python, "200 407", "{python}");
    let seen: Vec<String> = vendor
        .seen
        .lock()
        .expect("lock")
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(seen, ["/v1/rotate/before"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_lets_a_request_inside_an_intercepted_tunnel_finish() {
    let slow = std::time::Duration::from_millis(1500);
    let (vendor, vendor_ca) = scripted_tls(move |path, _| match path {
        "/v1/slow" => Answer::Slow(slow),
        _ => ok(),
    })
    .await;
    let (dir, local_ca, upstream) = intercepted_crm(
        "drain",
        vendor.addr,
        &vendor_ca.path,
        &bucket("api", 100, "100/s"),
    );
    let config = format!(
        "[proxy]\naccess_log = \"off\"\nshutdown_grace = \"10s\"\nca_dir = \"{}\"\n{upstream}",
        dir.display()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (proxy, served) = start_until(
        tollgate_proxy::Source::Text(config),
        TokioClock::system(),
        async move {
            let _ = stopped.await;
        },
    )
    .await;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&local_ca).expect("ca")).expect("pem");
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::https(format!("http://{}", proxy.addr)).expect("proxy"))
        .add_root_certificate(ca)
        .build()
        .expect("client");
    let url = format!("https://127.0.0.1:{}/v1/slow", vendor.addr.port());
    let call = tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) });
    while vendor.seen("/v1/slow").is_empty() {
        tokio::task::yield_now().await;
    }
    let stopping = std::time::Instant::now();
    let _ = stop.send(());
    served.await.expect("the proxy stopped");
    let drained = stopping.elapsed();
    assert_eq!(call.await.expect("call").expect("an answer"), 200);
    assert!(
        drained >= slow / 2,
        "the proxy waited for the request inside the tunnel ({drained:?})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
