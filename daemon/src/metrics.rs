//! The Prometheus endpoint: `GET /metrics` in the text exposition format (version 0.0.4)
//! on the configured address (`[metrics] listen`), over plain HTTP/1.1, one request per
//! connection. Every metric is described in docs/operations.md.
//!
//! The endpoint is small on purpose: a request head of at most [`MAX_REQUEST_BYTES`] that
//! must arrive within [`REQUEST_TIMEOUT`], at most [`MAX_CONNECTIONS`] at once, `GET` (or
//! `HEAD`) of `/metrics` and nothing else.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ipaccess_common::{AccountCounters, HostCounters};
use log::{debug, warn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use strum::VariantArray;

use crate::{
    datapath::netlink::XdpPath,
    protocol::{ErrorCode, Reason},
    service::ServiceError,
};

pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_CONNECTIONS: usize = 8;

/// Login checks answered since the daemon started, by reason.
#[derive(Default)]
pub struct CheckCounters([AtomicU64; Reason::VARIANTS.len()]);

impl CheckCounters {
    pub fn count(&self, reason: Reason) {
        let index = Reason::VARIANTS.iter().position(|&r| r == reason).expect("every reason is listed");
        self.0[index].fetch_add(1, Ordering::Relaxed);
    }

    pub fn read(&self) -> Vec<(Reason, u64)> {
        Reason::VARIANTS.iter().zip(&self.0).map(|(&r, n)| (r, n.load(Ordering::Relaxed))).collect()
    }
}

/// Changes refused since the daemon started because there was no room: the kernel's tables
/// were full (`tables_full`), or the account was at `[limits] max_entries_per_account`
/// (`too_many_entries`), at its eight enabled shared sets (`too_many_sets`) or at
/// `[limits] max_overrides_per_account` (`too_many_overrides`).
#[derive(Default)]
pub struct RefusalCounters {
    tables_full: AtomicU64,
    too_many_entries: AtomicU64,
    too_many_sets: AtomicU64,
    too_many_overrides: AtomicU64,
}

impl RefusalCounters {
    /// Counts a refusal with `code`, if it is one for want of room; other errors are not
    /// counted.
    pub fn count(&self, code: ErrorCode) {
        let counter = match code {
            ErrorCode::TablesFull => &self.tables_full,
            ErrorCode::TooManyEntries => &self.too_many_entries,
            ErrorCode::TooManySets => &self.too_many_sets,
            ErrorCode::TooManyOverrides => &self.too_many_overrides,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn read(&self) -> Vec<(ErrorCode, u64)> {
        vec![
            (ErrorCode::TablesFull, self.tables_full.load(Ordering::Relaxed)),
            (ErrorCode::TooManyEntries, self.too_many_entries.load(Ordering::Relaxed)),
            (ErrorCode::TooManySets, self.too_many_sets.load(Ordering::Relaxed)),
            (ErrorCode::TooManyOverrides, self.too_many_overrides.load(Ordering::Relaxed)),
        ]
    }
}

/// One account's figures.
pub struct AccountMetrics {
    pub account: String,
    pub counters: AccountCounters,
    pub live_overrides: usize,
}

/// Everything one scrape reports, read from the service at once.
pub struct Snapshot {
    pub accounts: Vec<AccountMetrics>,
    pub host: HostCounters,
    pub checks: Vec<(Reason, u64)>,
    /// Changes refused for want of room, by error code (see [`RefusalCounters`]).
    pub refused: Vec<(ErrorCode, u64)>,
    pub table_slots_used: u64,
    pub table_slots: u64,
    /// Account slots the maps have room for (slot 0 means "no account" and is not counted).
    pub account_slots: u64,
    pub reconcile_seconds: f64,
    /// Interfaces with the filter pinned, and where the kernel runs it (`None`: not found).
    pub interfaces: Vec<(String, Option<XdpPath>)>,
    /// A fleet node's standing with etcd; `None` on a single host.
    pub cluster: Option<ClusterMetrics>,
}

/// A fleet node's cluster health for the metrics.
#[derive(Clone, Debug, Default)]
pub struct ClusterMetrics {
    pub connected: bool,
    pub applied_revision: i64,
    pub cluster_revision: i64,
    pub apply_failures: u64,
    /// Accounts and sets whose latest version from the fleet the kernel still refuses.
    pub unenforced: u64,
    /// This node's clock minus etcd's, in seconds; `None` until measured.
    pub clock_offset_seconds: Option<f64>,
}

/// What the endpoint reads at each scrape: the service implements it, and this module
/// knows nothing else of it.
pub trait Source: Send + Sync + 'static {
    fn snapshot(&self) -> Result<Snapshot, ServiceError>;
}

/// The snapshot in the text exposition format.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::with_capacity(512 + s.accounts.len() * 600);
    let mut family = |name: &str, kind: &str, help: &str, samples: &mut dyn Iterator<Item = (String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let verdicts = |a: &AccountMetrics, bytes: bool| {
        let c = &a.counters;
        let values = if bytes {
            [c.passed_bytes, c.dropped_bytes, c.would_drop_bytes]
        } else {
            [c.passed_packets, c.dropped_packets, c.would_drop_packets]
        };
        let account = label_value(&a.account);
        ["passed", "dropped", "would_drop"]
            .into_iter()
            .zip(values)
            .map(move |(verdict, n)| (format!("{{account=\"{account}\",verdict=\"{verdict}\"}}"), n.to_string()))
    };
    family(
        "ipaccess_account_packets_total",
        "counter",
        "Packets to an account's bound destinations, by the XDP filter's verdict.",
        &mut s.accounts.iter().flat_map(|a| verdicts(a, false)),
    );
    family(
        "ipaccess_account_bytes_total",
        "counter",
        "Bytes (whole frames) to an account's bound destinations, by the XDP filter's verdict.",
        &mut s.accounts.iter().flat_map(|a| verdicts(a, true)),
    );
    let h = &s.host;
    family(
        "ipaccess_host_packets_total",
        "counter",
        "Packets the XDP filter decided without an account, by kind (malformed ones are dropped, the rest pass).",
        &mut [
            ("non_ip", h.non_ip_packets),
            ("unbound", h.unbound_packets),
            ("ndp", h.ndp_packets),
            ("malformed", h.malformed_packets),
        ]
        .into_iter()
        .map(|(kind, n)| (format!("{{kind=\"{kind}\"}}"), n.to_string())),
    );
    family(
        "ipaccess_checks_total",
        "counter",
        "Login checks answered since the daemon started, by reason.",
        &mut s.checks.iter().map(|(reason, n)| (format!("{{reason=\"{}\"}}", reason), n.to_string())),
    );
    family(
        "ipaccess_overrides_live",
        "gauge",
        "Support overrides in force, per account that has any.",
        &mut s
            .accounts
            .iter()
            .filter(|a| a.live_overrides > 0)
            .map(|a| (format!("{{account=\"{}\"}}", label_value(&a.account)), a.live_overrides.to_string())),
    );
    family(
        "ipaccess_changes_refused_total",
        "counter",
        "Changes refused since the daemon started for want of room: the kernel's tables full (tables_full), \
         the account at limits.max_entries_per_account (too_many_entries), at its eight enabled shared sets \
         (too_many_sets) or at limits.max_overrides_per_account (too_many_overrides).",
        &mut s.refused.iter().map(|(code, n)| (format!("{{reason=\"{code}\"}}"), n.to_string())),
    );
    let plain = |value: String| std::iter::once((String::new(), value));
    family(
        "ipaccess_table_slots_used",
        "gauge",
        "Slots of the table map in use (allowlists and bindings).",
        &mut plain(s.table_slots_used.to_string()),
    );
    family(
        "ipaccess_table_slots",
        "gauge",
        "Capacity of the table map, in slots.",
        &mut plain(s.table_slots.to_string()),
    );
    family("ipaccess_accounts", "gauge", "Accounts in the store.", &mut plain(s.accounts.len().to_string()));
    family(
        "ipaccess_account_slots",
        "gauge",
        "Accounts the kernel's maps have room for.",
        &mut plain(s.account_slots.to_string()),
    );
    family(
        "ipaccess_reconcile_duration_seconds",
        "gauge",
        "How long making the kernel's maps match the store took when the daemon started.",
        &mut plain(format!("{:.6}", s.reconcile_seconds)),
    );
    family(
        "ipaccess_interface_attached",
        "gauge",
        "1 for each interface the filter is pinned to, labelled with where the kernel runs it \
         (native, generic, offloaded, several, or none if the kernel shows no program there).",
        &mut s.interfaces.iter().map(|(iface, path)| {
            let path = path.map_or("none".to_string(), |p| p.to_string());
            (format!("{{interface=\"{}\",path=\"{path}\"}}", label_value(iface)), "1".to_string())
        }),
    );
    if let Some(c) = &s.cluster {
        family(
            "ipaccess_cluster_connected",
            "gauge",
            "1 while etcd answers this fleet node; 0 while it enforces its last policy without it.",
            &mut plain(u8::from(c.connected).to_string()),
        );
        family(
            "ipaccess_cluster_applied_revision",
            "gauge",
            "The etcd revision this node's store and kernel reflect.",
            &mut plain(c.applied_revision.to_string()),
        );
        family(
            "ipaccess_cluster_revision",
            "gauge",
            "The latest etcd revision this node has seen (every write counts, node records too).",
            &mut plain(c.cluster_revision.to_string()),
        );
        family(
            "ipaccess_cluster_apply_failures_total",
            "counter",
            "Changes the fleet committed that this node's kernel could not take (full tables).",
            &mut plain(c.apply_failures.to_string()),
        );
        family(
            "ipaccess_cluster_unenforced",
            "gauge",
            "Accounts and shared sets whose latest version from the fleet this node's kernel still refuses \
             (it enforces their previous version and retries every 10 s).",
            &mut plain(c.unenforced.to_string()),
        );
        if let Some(offset) = c.clock_offset_seconds {
            family(
                "ipaccess_cluster_clock_offset_seconds",
                "gauge",
                "This node's clock minus etcd's, as last measured; override expiry needs it within 1 s.",
                &mut plain(format!("{offset:.3}")),
            );
        }
    }
    out
}

/// A label value with `\`, `"` and newlines escaped, as the text format requires.
fn label_value(raw: &str) -> String {
    raw.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Serves scrapes on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, source: Arc<dyn Source>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("accepting a metrics connection: {e}");
                // EMFILE and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let _ = respond(&mut stream, "503 Service Unavailable", "too many metrics connections\n", false).await;
            });
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT * 2, scrape(&mut stream, source)).await {
                debug!("metrics connection timed out: {e}");
            }
            drop(permit);
        });
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Metrics { head_only: bool },
    NotFound,
    WrongMethod,
    Bad,
}

fn parse_request(head: &[u8]) -> Request {
    let Some(line) = head.split(|&b| b == b'\n').next() else { return Request::Bad };
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Bad;
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => Request::Metrics { head_only: false },
        ("HEAD", "/metrics") => Request::Metrics { head_only: true },
        (_, "/metrics") => Request::WrongMethod,
        _ => Request::NotFound,
    }
}

/// Why a request head was not read.
enum HeadError {
    /// Longer than [`MAX_REQUEST_BYTES`] without its end.
    TooLarge,
    /// The client closed the connection or it failed.
    Closed,
}

async fn scrape(stream: &mut TcpStream, source: Arc<dyn Source>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = |head: &[u8]| head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n");
    let read_head = async {
        while !complete(&head) {
            if head.len() > MAX_REQUEST_BYTES {
                return Err(HeadError::TooLarge);
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Err(HeadError::Closed),
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, read_head).await {
        Err(_) => return respond(stream, "408 Request Timeout", "request head not received in time\n", false).await,
        Ok(Err(HeadError::TooLarge)) => {
            let body = format!("request head longer than {MAX_REQUEST_BYTES} bytes\n");
            return respond(stream, "431 Request Header Fields Too Large", &body, false).await;
        }
        Ok(Err(HeadError::Closed)) => return Ok(()),
        Ok(Ok(())) => {}
    }
    match parse_request(&head) {
        Request::Metrics { head_only } => {
            let snapshot = tokio::task::spawn_blocking(move || source.snapshot()).await;
            match snapshot {
                Ok(Ok(snapshot)) => respond(stream, "200 OK", &render(&snapshot), head_only).await,
                Ok(Err(e)) => respond(stream, "500 Internal Server Error", &format!("{e}\n"), head_only).await,
                Err(e) => respond(stream, "500 Internal Server Error", &format!("{e}\n"), head_only).await,
            }
        }
        Request::NotFound => respond(stream, "404 Not Found", "only /metrics is served here\n", false).await,
        Request::WrongMethod => respond(stream, "405 Method Not Allowed", "use GET\n", false).await,
        Request::Bad => respond(stream, "400 Bad Request", "not an HTTP/1.x request\n", false).await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str, head_only: bool) -> std::io::Result<()> {
    let content_type = if status.starts_with("200") {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let allow = if status.starts_with("405") { "Allow: GET, HEAD\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_for_want_of_room_are_counted_by_code() {
        let refusals = RefusalCounters::default();
        for code in [
            ErrorCode::TooManySets,
            ErrorCode::TooManySets,
            ErrorCode::TablesFull,
            ErrorCode::BadRequest,
            ErrorCode::TooManyOverrides,
        ] {
            refusals.count(code);
        }
        assert_eq!(
            refusals.read(),
            [
                (ErrorCode::TablesFull, 1),
                (ErrorCode::TooManyEntries, 0),
                (ErrorCode::TooManySets, 2),
                (ErrorCode::TooManyOverrides, 1)
            ]
        );
    }

    #[test]
    fn requests_are_classified() {
        assert_eq!(parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Request::Metrics { head_only: false });
        assert_eq!(parse_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Request::Metrics { head_only: false });
        assert_eq!(parse_request(b"HEAD /metrics HTTP/1.1\r\n\r\n"), Request::Metrics { head_only: true });
        assert_eq!(parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"), Request::WrongMethod);
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(parse_request(b"GET /metrics\r\n\r\n"), Request::Bad);
        assert_eq!(parse_request(b"GET /metrics SPDY/3\r\n\r\n"), Request::Bad);
        assert_eq!(parse_request(b"\r\n\r\n"), Request::Bad);
    }

    #[test]
    fn rendering_escapes_labels_and_lists_every_reason() {
        let checks = CheckCounters::default();
        checks.count(Reason::Allowed);
        checks.count(Reason::Allowed);
        checks.count(Reason::Banned);
        let snapshot = Snapshot {
            accounts: vec![AccountMetrics {
                account: "a\"b\\c".into(),
                counters: AccountCounters { passed_packets: 3, dropped_bytes: 70, ..Default::default() },
                live_overrides: 2,
            }],
            host: HostCounters { unbound_packets: 5, ..Default::default() },
            checks: checks.read(),
            refused: {
                let refused = RefusalCounters::default();
                refused.count(ErrorCode::TooManyEntries);
                refused.count(ErrorCode::Lockout);
                refused.read()
            },
            table_slots_used: 10,
            table_slots: 100,
            account_slots: 1023,
            reconcile_seconds: 0.25,
            interfaces: vec![("eth0".into(), Some(XdpPath::Generic)), ("eth1".into(), None)],
            cluster: Some(ClusterMetrics {
                connected: false,
                applied_revision: 41,
                cluster_revision: 44,
                apply_failures: 0,
                unenforced: 2,
                clock_offset_seconds: Some(-1.25),
            }),
        };
        let text = render(&snapshot);
        for line in [
            r#"ipaccess_account_packets_total{account="a\"b\\c",verdict="passed"} 3"#,
            r#"ipaccess_account_bytes_total{account="a\"b\\c",verdict="dropped"} 70"#,
            r#"ipaccess_overrides_live{account="a\"b\\c"} 2"#,
            r#"ipaccess_host_packets_total{kind="unbound"} 5"#,
            r#"ipaccess_checks_total{reason="allowed"} 2"#,
            r#"ipaccess_checks_total{reason="banned"} 1"#,
            r#"ipaccess_checks_total{reason="monitor_would_deny"} 0"#,
            "ipaccess_accounts 1",
            r#"ipaccess_changes_refused_total{reason="tables_full"} 0"#,
            r#"ipaccess_changes_refused_total{reason="too_many_entries"} 1"#,
            "ipaccess_account_slots 1023",
            "ipaccess_reconcile_duration_seconds 0.250000",
            "# TYPE ipaccess_table_slots gauge",
            r#"ipaccess_interface_attached{interface="eth0",path="generic"} 1"#,
            r#"ipaccess_interface_attached{interface="eth1",path="none"} 1"#,
            "ipaccess_cluster_connected 0",
            "ipaccess_cluster_applied_revision 41",
            "ipaccess_cluster_revision 44",
            "ipaccess_cluster_apply_failures_total 0",
            "ipaccess_cluster_unenforced 2",
            "ipaccess_cluster_clock_offset_seconds -1.250",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("ipaccess_checks_total")).count(), Reason::VARIANTS.len());
    }
}
