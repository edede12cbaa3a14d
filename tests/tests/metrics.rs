//! The metrics endpoint of the real daemon, scraped over HTTP inside its network namespace
//! after known traffic and known login checks: every figure must be the one sent.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ipaccess_tests::daemon::{Launch, READY};
use ipaccess_tests::netns::{Netns, UdpEchoServer, echoed_udp, ping, send_udp, udp_client};
use ipaccess_tests::ops::Host;
use serde_json::json;

const LISTEN: &str = "127.0.0.1:9469";

/// One HTTP exchange on a fresh connection from inside `ns`: (status line, whole response).
fn http(ns: &Netns, addr: &str, request: &[u8]) -> (String, String) {
    let addr: SocketAddr = addr.parse().unwrap();
    let request = request.to_vec();
    ns.run(move || {
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect to the metrics endpoint");
        stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        // The server may answer (and close) before a too-large request is fully written.
        let _ = stream.write_all(&request);
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let response = String::from_utf8(response).expect("a UTF-8 response");
        (response.lines().next().unwrap_or_default().to_string(), response)
    })
}

/// `GET /metrics` as `name{labels}` → value.
fn scrape(host: &Host) -> BTreeMap<String, f64> {
    let (status, response) = http(&host.hosts.server, LISTEN, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{response}");
    assert!(response.contains("Content-Type: text/plain; version=0.0.4"), "{response}");
    let body = &response[response.find("\r\n\r\n").expect("a header end") + 4..];
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l:?}"));
            (series.to_string(), value.parse().unwrap_or_else(|e| panic!("{l:?}: {e}")))
        })
        .collect()
}

fn value(metrics: &BTreeMap<String, f64>, series: &str) -> f64 {
    *metrics.get(series).unwrap_or_else(|| panic!("no {series} in {metrics:#?}"))
}

fn metrics_config(host: &Host, metrics: &str) -> String {
    format!("interfaces = [\"{}\"]\n[metrics]\n{metrics}\n", host.hosts.server_if)
}

#[test]
fn metrics_match_traffic_and_checks() {
    const PAYLOAD: usize = 100;
    const FRAME: f64 = (14 + 20 + 8 + PAYLOAD) as f64;
    const DROPPED: usize = 40;
    const PASSED: usize = 25;
    const WOULD_DROP: usize = 15;
    let mut host = Host::new();
    host.write_config(&metrics_config(&host, &format!("listen = \"{LISTEN}\"")));
    host.start(&Launch::default());
    let (server, good, bad) = (host.hosts.server_v4, host.hosts.client_v4[0], host.hosts.client_v4[1]);
    let (enforced, monitored) = (SocketAddr::new(server.into(), 7000), SocketAddr::new(server.into(), 7001));

    for account in ["acme", "beta", "gamma"] {
        host.ok(json!({"cmd": "account_add", "account": account}));
    }
    for (account, port) in [("acme", 7000), ("beta", 7001)] {
        host.ok(json!({"cmd": "allow_add", "account": account, "cidr": format!("{good}/32")}));
        host.ok(json!({"cmd": "bind_add", "account": account, "addr": server, "port": port, "proto": "udp"}));
    }
    host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good}));
    host.ok(json!({"cmd": "account_mode", "account": "beta", "mode": "monitor"}));
    host.ok(json!({"cmd": "account_state", "account": "gamma", "state": "banned", "reason": "test"}));
    let before = scrape(&host);
    assert_eq!(value(&before, r#"ipaccess_account_packets_total{account="acme",verdict="dropped"}"#), 0.0);

    // Traffic: ARP first (not an account's), then datagrams of a known size.
    for source in [good, bad] {
        assert!(ping(&host.hosts.client, source.into(), server.into()), "ping from {source}");
    }
    let _echo = [enforced, monitored].map(|at| UdpEchoServer::start_in(&host.hosts.server, at).unwrap());
    let payload = [0x5a; PAYLOAD];
    send_udp(&udp_client(&host.hosts.client, bad.into(), enforced), &payload, DROPPED);
    let timeout = Duration::from_secs(2);
    assert_eq!(echoed_udp(&udp_client(&host.hosts.client, good.into(), enforced), &payload, PASSED, timeout), PASSED);
    let monitored_socket = udp_client(&host.hosts.client, bad.into(), monitored);
    assert_eq!(echoed_udp(&monitored_socket, &payload, WOULD_DROP, timeout), WOULD_DROP);

    // Checks: a known number of each reason.
    let checks = [
        ("acme", good, 3, "allowed"),
        ("acme", bad, 2, "address_not_allowed"),
        ("beta", bad, 1, "monitor_would_deny"),
        ("gamma", good, 1, "banned"),
        ("nobody", good, 1, "unknown_account"),
    ];
    for &(account, from, times, reason) in &checks {
        for _ in 0..times {
            let result = host.ok(json!({"cmd": "check", "account": account, "addr": IpAddr::from(from)}));
            assert_eq!(result["reason"], reason);
        }
    }
    let override_for = host.hosts.client_v4[2];
    host.ok(json!({"cmd": "override_grant", "account": "acme", "cidr": format!("{override_for}/32"),
                   "ttl_seconds": 3600, "ticket": "SUP-1", "reason": "metrics test"}));

    // The kernel counts asynchronously to us: wait (bounded) for the last dropped packet.
    let dropped = r#"ipaccess_account_packets_total{account="acme",verdict="dropped"}"#;
    let deadline = Instant::now() + Duration::from_secs(3);
    let metrics = loop {
        let metrics = scrape(&host);
        if value(&metrics, dropped) >= DROPPED as f64 || Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let traffic = |account: &str, verdict: &str| {
        let labels = format!("{{account=\"{account}\",verdict=\"{verdict}\"}}");
        (
            value(&metrics, &format!("ipaccess_account_packets_total{labels}")),
            value(&metrics, &format!("ipaccess_account_bytes_total{labels}")),
        )
    };
    let counted = |n: usize| (n as f64, n as f64 * FRAME);
    assert_eq!(traffic("acme", "dropped"), counted(DROPPED));
    assert_eq!(traffic("acme", "passed"), counted(PASSED));
    assert_eq!(traffic("acme", "would_drop"), counted(0));
    assert_eq!(traffic("beta", "would_drop"), counted(WOULD_DROP));
    assert_eq!(traffic("beta", "passed"), counted(WOULD_DROP));
    assert_eq!(traffic("beta", "dropped"), counted(0));
    assert_eq!(traffic("gamma", "passed"), counted(0));
    // The same figures as the control socket's `stats`.
    let stats = host.ok(json!({"cmd": "stats", "account": "acme"}));
    assert_eq!(stats["accounts"][0]["dropped_bytes"].as_f64(), Some(traffic("acme", "dropped").1));

    for (reason, times) in checks.iter().map(|&(_, _, times, reason)| (reason, times)) {
        assert_eq!(value(&metrics, &format!("ipaccess_checks_total{{reason=\"{reason}\"}}")), times as f64, "{reason}");
    }
    for reason in ["parent_banned", "terminated", "unconfirmed"] {
        assert_eq!(value(&metrics, &format!("ipaccess_checks_total{{reason=\"{reason}\"}}")), 0.0, "{reason}");
    }
    assert_eq!(value(&metrics, r#"ipaccess_overrides_live{account="acme"}"#), 1.0);
    assert!(!metrics.contains_key(r#"ipaccess_overrides_live{account="beta"}"#));

    let status = host.ok(json!({"cmd": "status"}));
    assert_eq!(value(&metrics, "ipaccess_accounts"), 3.0);
    assert_eq!(value(&metrics, "ipaccess_account_slots"), 1023.0);
    assert_eq!(value(&metrics, "ipaccess_table_slots"), status["table_slots"].as_f64().unwrap());
    assert_eq!(value(&metrics, "ipaccess_table_slots_used"), status["table_slots_used"].as_f64().unwrap());
    assert!(value(&metrics, "ipaccess_table_slots_used") > 0.0);
    let reconcile = value(&metrics, "ipaccess_reconcile_duration_seconds");
    assert!(reconcile > 0.0 && reconcile < 60.0, "{reconcile}");
    assert_eq!(value(&metrics, r#"ipaccess_host_packets_total{kind="malformed"}"#), 0.0);
    let attached = format!("ipaccess_interface_attached{{interface=\"{}\",path=\"native\"}}", host.hosts.server_if);
    assert_eq!(value(&metrics, &attached), 1.0, "the veth runs native XDP");
}

#[test]
fn metrics_endpoint_serves_only_get_metrics() {
    let mut host = Host::new();
    host.write_config(&metrics_config(&host, &format!("listen = \"{LISTEN}\"")));
    host.start(&Launch::default());
    let ns = &host.hosts.server;
    let (status, _) = http(ns, LISTEN, b"GET /other HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, response) = http(ns, LISTEN, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert!(response.contains("Allow: GET, HEAD"), "{response}");
    let (status, response) = http(ns, LISTEN, b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(response.ends_with("\r\n\r\n"), "HEAD got a body: {response}");
    let (status, _) = http(ns, LISTEN, b"hello\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    let huge = format!("GET /metrics HTTP/1.1\r\nX-Padding: {}\r\n\r\n", "x".repeat(20_000));
    let (status, _) = http(ns, LISTEN, huge.as_bytes());
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
    // A client that never finishes its request is answered and closed after the timeout.
    let started = Instant::now();
    let (status, _) = http(ns, LISTEN, b"GET /metrics HTTP/1.1\r\n");
    assert_eq!(status, "HTTP/1.1 408 Request Timeout");
    assert!(started.elapsed() >= Duration::from_secs(4) && started.elapsed() < Duration::from_secs(12));
    // And it still serves.
    assert!(scrape(&host).contains_key("ipaccess_accounts"));
}

#[test]
fn metrics_are_off_by_default_and_loopback_only_unless_allowed() {
    let mut host = Host::new();
    host.write_standalone_config();
    host.start(&Launch::default());
    let refused = host.hosts.server.run(|| TcpStream::connect(LISTEN).is_err());
    assert!(refused, "something listens on {LISTEN} with no [metrics] section");
    host.daemon.take().unwrap().terminate().expect("stops on SIGTERM");

    let outside = format!("{}:9469", host.hosts.server_v4);
    host.write_config(&metrics_config(&host, &format!("listen = \"{outside}\"")));
    let status = host.spawn(&Launch::default()).wait_exit(READY);
    host.daemon = None;
    assert!(status.is_some_and(|s| !s.success()), "started with metrics on {outside}: {status:?}");
    assert!(host.log_text().contains("set metrics.allow_non_loopback = true"), "{}", host.log_text());

    host.write_config(&metrics_config(&host, &format!("listen = \"{outside}\"\nallow_non_loopback = true")));
    host.start(&Launch::default());
    let (status, _) = http(&host.hosts.client, &outside, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
}
