//! Does this node's clock agree with etcd's?
//!
//! Expiry in the fleet is absolute: an override's document says the unix second it ends,
//! and each node turns that into a kernel deadline with its own clock. A node whose clock
//! runs 30 s ahead ends every override 30 s early. etcd's API carries no time, but its
//! client port also answers plain HTTP (`/version`), and that answer has a `Date` header:
//! etcd's clock, to the second.
//!
//! One answer bounds the difference only to within a second, so the node asks a dozen
//! times, 100 ms apart. Each answer says: etcd's clock read `date` (rounded down) at some
//! moment while the request was in flight; so `local - etcd` lies in
//! `(sent - date - 1, received - date]`. Taken together, and with one second boundary
//! crossed on the way, the bounds narrow to about 0.1 s plus the round trip. The node warns
//! only when the whole interval is beyond a second: a warning is certain, never noise.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use log::{info, warn};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Cluster;
use crate::config;

/// The most two clocks may differ: beyond it, overrides end noticeably early or late.
pub const TOLERANCE: Duration = Duration::from_secs(1);
/// How often the node measures again (clocks drift, and NTP may step them).
const EVERY: Duration = Duration::from_secs(60);
/// Answers per measurement, and the pause between them: together just over a second, so
/// that etcd's clock crosses a second boundary during the measurement.
const SAMPLES: usize = 12;
const PAUSE: Duration = Duration::from_millis(100);
/// One HTTP exchange may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One answer: when it was asked and answered (local clock, unix seconds), and the whole
/// unix second etcd's `Date` header named.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub sent: f64,
    pub received: f64,
    pub date: i64,
}

/// The interval `(low, high]` in which `local - etcd` (seconds) lies, by every sample; `None`
/// without samples, or when they contradict each other (a clock was stepped meanwhile).
pub fn bounds(samples: &[Sample]) -> Option<(f64, f64)> {
    let low = samples.iter().map(|s| s.sent - s.date as f64 - 1.0).reduce(f64::max)?;
    let high = samples.iter().map(|s| s.received - s.date as f64).reduce(f64::min)?;
    (low <= high).then_some((low, high))
}

/// The difference, when it is certainly more than [`TOLERANCE`] either way.
pub fn beyond_tolerance((low, high): (f64, f64)) -> bool {
    let tolerance = TOLERANCE.as_secs_f64();
    low >= tolerance || high <= -tolerance
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Measures every [`EVERY`] for as long as the node runs, keeps the estimate in the node's
/// health (for `status` and the metrics), and warns when the clocks disagree beyond
/// [`TOLERANCE`] (again every ten minutes while they do).
pub async fn watch(cluster: Arc<Cluster>) {
    let mut every = tokio::time::interval(EVERY);
    let mut warned_at: Option<tokio::time::Instant> = None;
    loop {
        every.tick().await;
        let measured = match Http::new(&cluster.config) {
            Ok(http) => measure(&http).await,
            Err(e) => Err(e),
        };
        let (low, high) = match measured {
            Ok(bounds) => bounds,
            Err(e) => {
                // etcd's own availability is the probe's business; this only says why
                // there is no estimate.
                log::debug!("cluster: the clock comparison with etcd failed: {e}");
                continue;
            }
        };
        let estimate = (low + high) / 2.0;
        cluster.health.lock().expect("health lock").clock_offset_ms = Some((estimate * 1000.0).round() as i64);
        if beyond_tolerance((low, high)) {
            if warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(600)) {
                warn!(
                    "cluster: this node's clock is {:.1} s {} etcd's (between {:.2} and {:.2} s); override expiry is \
                     absolute, so overrides end at the wrong time here: synchronise the clocks (NTP)",
                    estimate.abs(),
                    if estimate > 0.0 { "ahead of" } else { "behind" },
                    low.abs().min(high.abs()),
                    low.abs().max(high.abs()),
                );
                warned_at = Some(tokio::time::Instant::now());
            }
        } else if warned_at.take().is_some() {
            info!("cluster: this node's clock agrees with etcd's again ({estimate:+.2} s)");
        }
    }
}

/// One measurement: [`SAMPLES`] answers from the first endpoint that gives them.
async fn measure(http: &Http) -> Result<(f64, f64), String> {
    let mut last_error = String::from("no endpoint configured");
    for endpoint in &http.endpoints {
        let mut samples = Vec::with_capacity(SAMPLES);
        for i in 0..SAMPLES {
            if i > 0 {
                tokio::time::sleep(PAUSE).await;
            }
            match tokio::time::timeout(REQUEST_TIMEOUT, http.sample(endpoint)).await {
                Ok(Ok(sample)) => samples.push(sample),
                Ok(Err(e)) => {
                    last_error = format!("{}: {e}", endpoint.url);
                    break;
                }
                Err(_) => {
                    last_error = format!("{}: no answer within {REQUEST_TIMEOUT:?}", endpoint.url);
                    break;
                }
            }
        }
        if samples.len() == SAMPLES {
            return bounds(&samples).ok_or_else(|| "the samples contradict each other (a clock was stepped)".into());
        }
    }
    Err(last_error)
}

/// An etcd client URL split for a plain HTTP request.
struct Endpoint {
    url: String,
    tls: bool,
    /// `host:port`, as TCP connects to it.
    address: String,
    host: String,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            (false, url)
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => return Err(format!("{url}: no port")),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        Ok(Endpoint { url: url.to_owned(), tls, address: authority.to_owned(), host })
    }
}

/// What the node needs to ask etcd's HTTP side: the endpoints, and for `https://` the same
/// CA and client certificate as its gRPC connection.
struct Http {
    endpoints: Vec<Endpoint>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Http {
    fn new(config: &config::Cluster) -> Result<Http, String> {
        let endpoints = config.endpoints.iter().map(|url| Endpoint::parse(url)).collect::<Result<Vec<_>, _>>()?;
        let tls = if endpoints.iter().any(|e| e.tls) { Some(tls_connector(config)?) } else { None };
        Ok(Http { endpoints, tls })
    }

    async fn sample(&self, endpoint: &Endpoint) -> Result<Sample, String> {
        let sent = unix_now();
        let stream = tokio::net::TcpStream::connect(&endpoint.address).await.map_err(|e| e.to_string())?;
        let head = match (&self.tls, endpoint.tls) {
            (Some(tls), true) => {
                let name = ServerName::try_from(endpoint.host.clone()).map_err(|e| e.to_string())?;
                exchange(tls.connect(name, stream).await.map_err(|e| e.to_string())?, &endpoint.host).await?
            }
            _ => exchange(stream, &endpoint.host).await?,
        };
        let received = unix_now();
        Ok(Sample { sent, received, date: date_header(&head)? })
    }
}

/// `GET /version`; the answer's head (status line and headers).
async fn exchange(mut stream: impl AsyncRead + AsyncWrite + Unpin, host: &str) -> Result<String, String> {
    let request = format!("GET /version HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 || head.len() > 16 * 1024 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The unix second an HTTP answer's `Date` header names.
fn date_header(head: &str) -> Result<i64, String> {
    let value = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("date"))
        .map(|(_, value)| value.trim())
        .ok_or("etcd's answer has no Date header")?;
    let time = httpdate::parse_http_date(value).map_err(|e| format!("Date {value:?}: {e}"))?;
    Ok(time.duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs() as i64)
}

fn tls_connector(config: &config::Cluster) -> Result<tokio_rustls::TlsConnector, String> {
    let read = |path: &std::path::Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &config.ca_file {
        for cert in CertificateDer::pem_slice_iter(&read(ca)?) {
            let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
            roots.add(cert).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let client = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_slice_iter(&read(cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| format!("{}: {e}", key.display()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(client)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples 100 ms apart from a local clock `offset` seconds ahead of etcd's, each taking
    /// `rtt` seconds, etcd stamping the Date midway.
    fn samples(offset: f64, rtt: f64) -> Vec<Sample> {
        (0..SAMPLES)
            .map(|i| {
                let sent = 1_700_000_000.37 + i as f64 * 0.1;
                let etcd_at_stamp = sent + rtt / 2.0 - offset;
                Sample { sent, received: sent + rtt, date: etcd_at_stamp.floor() as i64 }
            })
            .collect()
    }

    #[test]
    fn the_bounds_hold_the_true_offset_and_are_narrow() {
        for offset in [-3.2, -1.05, -0.4, 0.0, 0.25, 0.95, 1.3, 7.77] {
            let (low, high) = bounds(&samples(offset, 0.004)).unwrap();
            assert!(low < offset && offset <= high, "{offset} outside ({low}, {high}]");
            assert!(high - low < 0.12, "({low}, {high}] is too wide for 100 ms steps");
        }
    }

    #[test]
    fn only_a_certain_difference_beyond_a_second_warns() {
        assert!(beyond_tolerance(bounds(&samples(1.3, 0.004)).unwrap()));
        assert!(beyond_tolerance(bounds(&samples(-2.0, 0.004)).unwrap()));
        assert!(!beyond_tolerance(bounds(&samples(0.5, 0.004)).unwrap()));
        assert!(!beyond_tolerance(bounds(&samples(-0.9, 0.004)).unwrap()));
        // A slow answer leaves the interval wide: it warns only when all of it is beyond.
        assert!(!beyond_tolerance((0.8, 1.6)));
        assert!(beyond_tolerance((1.01, 1.6)));
    }

    #[test]
    fn contradicting_samples_give_no_bounds() {
        let mut stepped = samples(0.0, 0.004);
        stepped[6].date += 5;
        assert_eq!(bounds(&stepped), None);
        assert_eq!(bounds(&[]), None);
    }

    #[test]
    fn endpoints_and_dates_read() {
        let e = Endpoint::parse("https://[fd00::1]:2379").unwrap();
        assert!(e.tls);
        assert_eq!((e.address.as_str(), e.host.as_str()), ("[fd00::1]:2379", "fd00::1"));
        let e = Endpoint::parse("http://198.18.101.1:2379/").unwrap();
        assert!(!e.tls);
        assert_eq!(e.address, "198.18.101.1:2379");
        assert!(Endpoint::parse("http://etcd").is_err());
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: Sun, 29 Nov 2026 15:46:30 GMT\r\n\r\n";
        assert_eq!(date_header(head), Ok(1_795_967_190));
        assert!(date_header("HTTP/1.1 200 OK\r\n\r\n").is_err());
    }
}
