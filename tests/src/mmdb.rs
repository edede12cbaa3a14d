//! A tiny MaxMind DB (MMDB, format 2.0) writer, for tests only: the `maxminddb` crate reads
//! the format but cannot write it, and the tests must not ship real location data. It
//! writes what the daemon's reader needs and nothing more: an IPv6 search tree (IPv4
//! networks live at `::a.b.c.d`, the first 96 bits zero, as MaxMind places them), 32-bit
//! records, a data section of maps, strings and unsigned integers, and the metadata.
//!
//! The file, in order:
//! 1. the search tree: `node_count` nodes of two records (bit 0 goes left, bit 1 right),
//!    each a big-endian u32 here. A record below `node_count` is the next node; equal to it,
//!    "no data"; above it, data at `record - node_count - 16` in the data section;
//! 2. sixteen zero bytes, then the data section;
//! 3. the marker `\xab\xcd\xefMaxMind.com`, then the metadata: one map in the data format.
//!
//! Every value in the data format starts with a control byte: its top three bits are the
//! type (7 and above: 0, with `type - 7` in the byte after), its low five bits the size (29,
//! 30 and 31 say that one, two or three more bytes hold it).

use std::net::IpAddr;

use ipnet::IpNet;

/// A value of the data section.
#[derive(Clone, Debug)]
pub enum Data {
    Str(String),
    U16(u16),
    U32(u32),
    U64(u64),
    Map(Vec<(String, Data)>),
    Array(Vec<Data>),
}

/// A map from `(key, value)` pairs.
pub fn map<'a>(pairs: impl IntoIterator<Item = (&'a str, Data)>) -> Data {
    Data::Map(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

pub fn text(s: &str) -> Data {
    Data::Str(s.to_string())
}

const STRING: u8 = 2;
const UINT16: u8 = 5;
const UINT32: u8 = 6;
const MAP: u8 = 7;
const UINT64: u8 = 9;
const ARRAY: u8 = 11;
const MARKER: &[u8] = b"\xab\xcd\xefMaxMind.com";

/// The control byte(s) of a value of `kind` and `size` (bytes, pairs or elements).
fn control(out: &mut Vec<u8>, kind: u8, size: usize) {
    let (low, more): (u8, Vec<u8>) = match size {
        0..29 => (size as u8, Vec::new()),
        29..285 => (29, vec![(size - 29) as u8]),
        285..65_821 => (30, ((size - 285) as u16).to_be_bytes().to_vec()),
        _ => (31, ((size - 65_821) as u32).to_be_bytes()[1..].to_vec()),
    };
    if kind < 8 {
        out.push(kind << 5 | low);
    } else {
        out.extend([low, kind - 7]);
    }
    out.extend(more);
}

/// An unsigned integer: big-endian, without its leading zero bytes.
fn uint(out: &mut Vec<u8>, kind: u8, value: u64) {
    let bytes = value.to_be_bytes();
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    control(out, kind, bytes.len() - first);
    out.extend(&bytes[first..]);
}

fn encode(out: &mut Vec<u8>, value: &Data) {
    match value {
        Data::Str(s) => {
            control(out, STRING, s.len());
            out.extend(s.as_bytes());
        }
        Data::U16(n) => uint(out, UINT16, u64::from(*n)),
        Data::U32(n) => uint(out, UINT32, u64::from(*n)),
        Data::U64(n) => uint(out, UINT64, *n),
        Data::Map(pairs) => {
            control(out, MAP, pairs.len());
            for (key, value) in pairs {
                encode(out, &Data::Str(key.clone()));
                encode(out, value);
            }
        }
        Data::Array(items) => {
            control(out, ARRAY, items.len());
            items.iter().for_each(|item| encode(out, item));
        }
    }
}

/// A search tree record while the tree is built.
#[derive(Clone, Copy, PartialEq)]
enum Record {
    Empty,
    Node(usize),
    /// The index of a network's data.
    Data(usize),
}

/// A network as 128 bits and a prefix length in the IPv6 tree.
fn tree_key(net: &IpNet) -> (u128, u8) {
    match net.addr() {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 96 + net.prefix_len()),
        IpAddr::V6(a) => (u128::from(a), net.prefix_len()),
    }
}

/// A database of `database_type` in which each network holds its data. Networks must not
/// overlap (this writer does not split a network to make room for a narrower one).
pub fn build(database_type: &str, networks: &[(IpNet, Data)]) -> Vec<u8> {
    let mut nodes: Vec<[Record; 2]> = vec![[Record::Empty; 2]];
    for (index, (net, _)) in networks.iter().enumerate() {
        let (bits, len) = tree_key(net);
        assert!(len > 0, "{net}: the whole space is not a network this writer places");
        let mut node = 0;
        for depth in 0..len {
            let side = (bits >> (127 - depth) & 1) as usize;
            if depth + 1 == len {
                assert!(nodes[node][side] == Record::Empty, "{net} overlaps another network");
                nodes[node][side] = Record::Data(index);
                break;
            }
            node = match nodes[node][side] {
                Record::Node(next) => next,
                Record::Empty => {
                    nodes.push([Record::Empty; 2]);
                    nodes[node][side] = Record::Node(nodes.len() - 1);
                    nodes.len() - 1
                }
                Record::Data(_) => panic!("{net} overlaps another network"),
            };
        }
    }
    let mut data = Vec::new();
    let offsets: Vec<usize> = networks
        .iter()
        .map(|(_, value)| {
            let at = data.len();
            encode(&mut data, value);
            at
        })
        .collect();
    let count = nodes.len();
    let mut file = Vec::new();
    for node in &nodes {
        for record in node {
            let value = match *record {
                Record::Empty => count,
                Record::Node(next) => next,
                Record::Data(index) => count + 16 + offsets[index],
            };
            file.extend(u32::try_from(value).expect("a small database").to_be_bytes());
        }
    }
    file.extend([0; 16]);
    file.extend(data);
    file.extend(MARKER);
    let metadata = map([
        ("binary_format_major_version", Data::U16(2)),
        ("binary_format_minor_version", Data::U16(0)),
        ("build_epoch", Data::U64(1_795_939_200)),
        ("database_type", text(database_type)),
        ("description", map([("en", text("ipaccess test locations: made-up places for test addresses"))])),
        ("ip_version", Data::U16(6)),
        ("languages", Data::Array(vec![text("en")])),
        ("node_count", Data::U32(count as u32)),
        ("record_size", Data::U16(32)),
    ]);
    encode(&mut file, &metadata);
    file
}

/// A GeoIP2-City-shaped record: a country code, and a city's English name if any.
pub fn place(country: &str, city: Option<&str>) -> Data {
    let mut fields = vec![("country", map([("iso_code", text(country))]))];
    if let Some(city) = city {
        fields.push(("city", map([("names", map([("en", text(city))]))])));
    }
    map(fields)
}

/// The test locations: made-up places (ISO's private-use country codes XA and XB) in the
/// benchmark and unique-local ranges, and nothing else.
pub const TESTVILLE: &str = "198.18.0.0/16";
pub const COUNTRY_ONLY: &str = "198.19.0.0/17";
pub const TESTVILLE_V6: &str = "fd00:1::/32";
pub const HOSTILE_V6: &str = "fd00:bad::/32";
/// A city name with a terminal escape in it, as a damaged or hostile database might hold.
pub const HOSTILE_CITY: &str = "Evil\x1b[2Jtown";

/// A City database of the test locations.
pub fn test_city_database() -> Vec<u8> {
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    build(
        "ipaccess-Test-City",
        &[
            (net(TESTVILLE), place("XA", Some("Testville"))),
            (net(COUNTRY_ONLY), place("XB", None)),
            (net(TESTVILLE_V6), place("XA", Some("Testville"))),
            (net(HOSTILE_V6), place("XB", Some(HOSTILE_CITY))),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use maxminddb::{Reader, geoip2};

    fn city(reader: &Reader<Vec<u8>>, addr: &str) -> Option<(Option<String>, Option<String>)> {
        let found = reader.lookup(addr.parse().unwrap()).unwrap();
        let record = found.decode::<geoip2::City>().unwrap()?;
        Some((record.country.iso_code.map(String::from), record.city.names.english.map(String::from)))
    }

    /// The crate that reads real databases reads this one: metadata, every test network,
    /// the addresses between and beyond them, and a full verification of the file.
    #[test]
    fn the_reader_reads_what_the_writer_wrote() {
        let reader = Reader::from_source(test_city_database()).unwrap();
        reader.verify().unwrap();
        let m = reader.metadata();
        assert_eq!((m.database_type.as_str(), m.ip_version, m.record_size), ("ipaccess-Test-City", 6, 32));
        let some = |country: &str, city: Option<&str>| Some((Some(country.into()), city.map(String::from)));
        for addr in ["198.18.0.1", "198.18.255.255"] {
            assert_eq!(city(&reader, addr), some("XA", Some("Testville")), "{addr}");
        }
        assert_eq!(city(&reader, "198.19.0.9"), some("XB", None));
        assert_eq!(city(&reader, "fd00:1::7"), some("XA", Some("Testville")));
        assert_eq!(city(&reader, "fd00:bad::1"), some("XB", Some(HOSTILE_CITY)));
        for addr in ["198.19.128.1", "198.17.255.255", "192.0.2.1", "fd00:2::1", "2001:db8::1", "::1"] {
            assert_eq!(city(&reader, addr), None, "{addr}");
        }
    }

    #[test]
    fn sizes_past_the_control_byte() {
        let long = "x".repeat(300);
        let db = build("ipaccess-Test-City", &[("198.18.0.0/15".parse().unwrap(), place("XA", Some(&long)))]);
        let reader = Reader::from_source(db).unwrap();
        reader.verify().unwrap();
        assert_eq!(city(&reader, "198.19.1.1"), Some((Some("XA".into()), Some(long))));
    }
}
