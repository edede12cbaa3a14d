//! Ethernet frame builders and a seeded random frame generator.
//!
//! The builders make well-formed frames by default and let every field the XDP parser
//! looks at be overridden, so tests can craft exactly the malformation they want. The
//! generator (`PacketGen`) mixes those knobs at random, aiming most frames at the
//! addresses and ports of an `AddressPool` so that the interesting verdict paths are hit.
//! Checksums are left zero: the XDP program never looks at them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipaccess_common::packet::*;
use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{BindTarget, ModelPolicy};

pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_LLDP: u16 = 0x88cc;
pub const IPPROTO_ICMP: u8 = 1;
/// IPv6 "no next header".
pub const IPPROTO_NONE: u8 = 59;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
pub const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;

const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// Minimum Ethernet frame without FCS; shorter frames get zero padding on the wire.
pub const ETH_MIN_FRAME: usize = 60;

// ---------------------------------------------------------------------------------------
// Ethernet
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanTag {
    /// 0x8100 (802.1Q) or 0x88a8 (802.1ad).
    pub tpid: u16,
    pub tci: u16,
}

impl VlanTag {
    pub fn dot1q(vid: u16) -> Self {
        VlanTag { tpid: ETH_P_8021Q, tci: vid & 0x0fff }
    }
    pub fn dot1ad(vid: u16) -> Self {
        VlanTag { tpid: ETH_P_8021AD, tci: vid & 0x0fff }
    }
}

/// MACs, VLAN tags (outermost first), EtherType, payload.
pub fn ethernet(tags: &[VlanTag], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HDR_LEN + tags.len() * VLAN_HDR_LEN + payload.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    for t in tags {
        f.extend_from_slice(&t.tpid.to_be_bytes());
        f.extend_from_slice(&t.tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Inserts VLAN tags (outermost first) after the MAC addresses of an existing frame.
pub fn with_vlans(frame: &[u8], tags: &[VlanTag]) -> Vec<u8> {
    assert!(frame.len() >= 12);
    let mut f = frame[..12].to_vec();
    for t in tags {
        f.extend_from_slice(&t.tpid.to_be_bytes());
        f.extend_from_slice(&t.tci.to_be_bytes());
    }
    f.extend_from_slice(&frame[12..]);
    f
}

/// Zero-pads to the 60-byte Ethernet minimum, as a NIC would.
pub fn pad_to_min(mut frame: Vec<u8>) -> Vec<u8> {
    if frame.len() < ETH_MIN_FRAME {
        frame.resize(ETH_MIN_FRAME, 0);
    }
    frame
}

/// The frame cut at every length from 14 (BPF_PROG_TEST_RUN's minimum) to `len - 1`.
pub fn truncations(frame: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    (ETH_HDR_LEN..frame.len()).map(move |n| frame[..n].to_vec())
}

// ---------------------------------------------------------------------------------------
// Non-IP payloads
// ---------------------------------------------------------------------------------------

/// ARP body (Ethernet/IPv4); `oper` 1 = request, 2 = reply.
pub fn arp_body(oper: u16, sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut b = vec![0, 1, 0x08, 0x00, 6, 4];
    b.extend_from_slice(&oper.to_be_bytes());
    b.extend_from_slice(&SRC_MAC);
    b.extend_from_slice(&sender_ip.octets());
    b.extend_from_slice(&if oper == 1 { [0; 6] } else { DST_MAC });
    b.extend_from_slice(&target_ip.octets());
    b
}

/// Broadcast "who has target_ip" frame, padded to the minimum size.
pub fn arp_request(sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet(&[], ETH_P_ARP, &arp_body(1, sender_ip, target_ip));
    f[..6].copy_from_slice(&[0xff; 6]);
    pad_to_min(f)
}

/// Minimal LLDPDU: chassis id, port id, TTL, end.
pub fn lldp_body() -> Vec<u8> {
    let tlv = |ty: u16, value: &[u8]| {
        let mut t = ((ty << 9) | value.len() as u16).to_be_bytes().to_vec();
        t.extend_from_slice(value);
        t
    };
    let mut mac_id = vec![4u8];
    mac_id.extend_from_slice(&SRC_MAC);
    let mut b = tlv(1, &mac_id);
    b.extend(tlv(2, &[7, b'e', b't', b'h', b'0']));
    b.extend(tlv(3, &120u16.to_be_bytes()));
    b.extend(tlv(0, &[]));
    b
}

pub fn lldp() -> Vec<u8> {
    let mut f = ethernet(&[], ETH_P_LLDP, &lldp_body());
    f[..6].copy_from_slice(&[0x01, 0x80, 0xc2, 0, 0, 0x0e]);
    pad_to_min(f)
}

// ---------------------------------------------------------------------------------------
// IPv4
// ---------------------------------------------------------------------------------------

/// An IPv4 header; `None` overrides mean "the correct value".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Header {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ttl: u8,
    /// Raw option bytes; should be a multiple of 4 (IHL counts 32-bit words).
    pub options: Vec<u8>,
    /// In 8-byte units, 0..=0x1fff.
    pub frag_offset: u16,
    pub more_fragments: bool,
    pub dont_fragment: bool,
    pub version: u8,
    /// IHL field (low nibble); default (options.len() + 20) / 4.
    pub ihl: Option<u8>,
    /// Default: header + payload length.
    pub total_length: Option<u16>,
}

impl Ipv4Header {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8) -> Self {
        Ipv4Header {
            src,
            dst,
            protocol,
            ttl: 64,
            options: Vec::new(),
            frag_offset: 0,
            more_fragments: false,
            dont_fragment: false,
            version: 4,
            ihl: None,
            total_length: None,
        }
    }

    /// Header (20 bytes + options as given, whatever IHL says) followed by `payload`.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let hdr_len = IPV4_HDR_LEN + self.options.len();
        let ihl = self.ihl.unwrap_or((hdr_len / 4) as u8) & 0xf;
        let total = self.total_length.unwrap_or((hdr_len + payload.len()) as u16);
        let frag = (self.frag_offset & 0x1fff) | (self.more_fragments as u16) << 13 | (self.dont_fragment as u16) << 14;
        let mut p = Vec::with_capacity(hdr_len + payload.len());
        p.push((self.version << 4) | ihl);
        p.push(0); // DSCP/ECN
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&0x1234u16.to_be_bytes()); // identification
        p.extend_from_slice(&frag.to_be_bytes());
        p.push(self.ttl);
        p.push(self.protocol);
        p.extend_from_slice(&[0, 0]); // checksum: unchecked by XDP
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&self.options);
        p.extend_from_slice(payload);
        p
    }
}

// ---------------------------------------------------------------------------------------
// IPv6
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Ext {
    /// `len8`: the header's length field: (len8 + 1) * 8 bytes in all.
    HopByHop {
        len8: u8,
    },
    Routing {
        len8: u8,
    },
    DestOpts {
        len8: u8,
    },
    /// `offset` in 8-byte units (0..=0x1fff); offset 0 is the first fragment.
    Fragment {
        offset: u16,
        more: bool,
    },
}

impl Ipv6Ext {
    pub fn code(&self) -> u8 {
        match self {
            Ipv6Ext::HopByHop { .. } => IPPROTO_HOPOPTS,
            Ipv6Ext::Routing { .. } => IPPROTO_ROUTING,
            Ipv6Ext::DestOpts { .. } => IPPROTO_DSTOPTS,
            Ipv6Ext::Fragment { .. } => IPPROTO_FRAGMENT,
        }
    }

    /// The header bytes, with `next` as its next-header field.
    pub fn build(&self, next: u8) -> Vec<u8> {
        match *self {
            Ipv6Ext::HopByHop { len8 } | Ipv6Ext::Routing { len8 } | Ipv6Ext::DestOpts { len8 } => {
                // Body is PadN-ish filler; only the length matters to the parser.
                let mut h = vec![0u8; (len8 as usize + 1) * 8];
                h[0] = next;
                h[1] = len8;
                if let Ipv6Ext::Routing { .. } = self {
                    h[2] = 4; // segment routing type, segments left 0
                } else {
                    h[2] = 1; // PadN option
                    h[3] = h.len() as u8 - 4;
                }
                h
            }
            Ipv6Ext::Fragment { offset, more } => {
                let mut h = vec![next, 0];
                h.extend_from_slice(&(((offset & 0x1fff) << 3) | more as u16).to_be_bytes());
                h.extend_from_slice(&0xdead_beefu32.to_be_bytes());
                h
            }
        }
    }
}

/// An IPv6 header plus extension-header chain; `next_header` is what follows the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Header {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub next_header: u8,
    pub hop_limit: u8,
    pub version: u8,
    pub exts: Vec<Ipv6Ext>,
    /// Default: extension headers + payload.
    pub payload_length: Option<u16>,
}

impl Ipv6Header {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8) -> Self {
        Ipv6Header { src, dst, next_header, hop_limit: 64, version: 6, exts: Vec::new(), payload_length: None }
    }

    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut chain = Vec::new();
        for (i, e) in self.exts.iter().enumerate() {
            let next = self.exts.get(i + 1).map_or(self.next_header, Ipv6Ext::code);
            chain.extend(e.build(next));
        }
        let first = self.exts.first().map_or(self.next_header, Ipv6Ext::code);
        let plen = self.payload_length.unwrap_or((chain.len() + payload.len()) as u16);
        let mut p = Vec::with_capacity(IPV6_HDR_LEN + chain.len() + payload.len());
        p.extend_from_slice(&[self.version << 4, 0, 0, 0]);
        p.extend_from_slice(&plen.to_be_bytes());
        p.push(first);
        p.push(self.hop_limit);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend(chain);
        p.extend_from_slice(payload);
        p
    }
}

// ---------------------------------------------------------------------------------------
// Transport headers
// ---------------------------------------------------------------------------------------

/// 20-byte TCP header, SYN set.
pub fn tcp_header(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1u32.to_be_bytes());
    t[12] = 5 << 4; // data offset
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t
}

/// 8-byte UDP header announcing `payload_len` bytes of data.
pub fn udp_header(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut u = Vec::with_capacity(8);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u
}

/// ICMPv4 echo request (8 bytes).
pub fn icmpv4_echo() -> Vec<u8> {
    vec![8, 0, 0, 0, 0, 1, 0, 1]
}

/// ICMPv6 message of `ty`/`code` with a 4-byte body (8 bytes; NS/NA would carry a target
/// address too, but the parser reads only the type).
pub fn icmpv6(ty: u8, code: u8) -> Vec<u8> {
    vec![ty, code, 0, 0, 0, 0, 0, 0]
}

// ---------------------------------------------------------------------------------------
// Whole-frame conveniences
// ---------------------------------------------------------------------------------------

pub fn ipv4_tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let ip = Ipv4Header::new(src, dst, IPPROTO_TCP).build(&tcp_header(sport, dport));
    pad_to_min(ethernet(&[], ETH_P_IPV4, &ip))
}

pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let ip = Ipv4Header::new(src, dst, IPPROTO_UDP).build(&udp_header(sport, dport, 0));
    pad_to_min(ethernet(&[], ETH_P_IPV4, &ip))
}

pub fn ipv4_icmp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let ip = Ipv4Header::new(src, dst, IPPROTO_ICMP).build(&icmpv4_echo());
    pad_to_min(ethernet(&[], ETH_P_IPV4, &ip))
}

pub fn ipv6_tcp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let ip = Ipv6Header::new(src, dst, IPPROTO_TCP).build(&tcp_header(sport, dport));
    ethernet(&[], ETH_P_IPV6, &ip)
}

pub fn ipv6_udp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    let ip = Ipv6Header::new(src, dst, IPPROTO_UDP).build(&udp_header(sport, dport, 0));
    ethernet(&[], ETH_P_IPV6, &ip)
}

/// ICMPv6 of type `ty` (e.g. 135 neighbour solicitation, 128 echo request).
pub fn ipv6_icmp(src: Ipv6Addr, dst: Ipv6Addr, ty: u8) -> Vec<u8> {
    let ip = Ipv6Header::new(src, dst, IPPROTO_ICMPV6).build(&icmpv6(ty, 0));
    ethernet(&[], ETH_P_IPV6, &ip)
}

/// TCP frame for either family. Panics if the families differ.
pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_tcp(s, d, sport, dport),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_tcp(s, d, sport, dport),
        _ => panic!("tcp: mixed address families {src} -> {dst}"),
    }
}

/// UDP frame for either family. Panics if the families differ.
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_udp(s, d, sport, dport),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6_udp(s, d, sport, dport),
        _ => panic!("udp: mixed address families {src} -> {dst}"),
    }
}

// ---------------------------------------------------------------------------------------
// Random generation
// ---------------------------------------------------------------------------------------

/// Addresses and ports the generator should aim at (besides random ones).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPool {
    pub src_v4: Vec<Ipv4Addr>,
    pub src_v6: Vec<Ipv6Addr>,
    pub dst_v4: Vec<Ipv4Addr>,
    pub dst_v6: Vec<Ipv6Addr>,
    pub ports: Vec<u16>,
    /// Exact (destination, protocol, port) triples; the generator sometimes aims a TCP/UDP
    /// packet at one of these as a whole so port bindings are hit, not just their parts.
    pub services: Vec<(IpAddr, u8, u16)>,
    /// For each bound destination, sources inside the allowlists of the accounts bound
    /// there: a packet aimed at a binding sometimes comes from one of them, so that allowed
    /// (and nearly allowed) sources reach the account they belong to, not only others.
    pub covered: std::collections::HashMap<IpAddr, Vec<IpAddr>>,
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

impl AddressPool {
    /// Sources at the edges of, inside and just outside every allowlist entry; bound
    /// destinations and their neighbours (including the v4-mapped / embedded-v4 twins,
    /// which must *not* match); bound ports and their neighbours.
    pub fn from_policy(policy: &ModelPolicy) -> Self {
        let mut pool = AddressPool::default();
        for acct in policy.accounts.values() {
            for (net, _) in &acct.entries {
                match net {
                    IpNet::V4(n) => {
                        let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
                        let mid = lo + (hi - lo) / 2;
                        for a in [lo, hi, mid, lo.wrapping_sub(1), hi.wrapping_add(1)] {
                            push_unique(&mut pool.src_v4, Ipv4Addr::from(a));
                        }
                    }
                    IpNet::V6(n) => {
                        let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
                        let mid = lo + (hi - lo) / 2;
                        for a in [lo, hi, mid, lo.wrapping_sub(1), hi.wrapping_add(1)] {
                            push_unique(&mut pool.src_v6, Ipv6Addr::from(a));
                        }
                    }
                }
            }
        }
        for b in &policy.bindings {
            if let Some(acct) = policy.accounts.get(&b.account) {
                let sources = pool.covered.entry(b.addr).or_default();
                for (net, _) in &acct.entries {
                    // Both ends and the middle, so prefix edges are exercised too.
                    let (lo, hi) = match net {
                        IpNet::V4(n) => (u128::from(u32::from(n.network())), u128::from(u32::from(n.broadcast()))),
                        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
                    };
                    for a in [lo, lo + (hi - lo) / 2, hi] {
                        let a = match net {
                            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(a as u32)),
                            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(a)),
                        };
                        push_unique(sources, a);
                    }
                }
            }
            match b.addr {
                IpAddr::V4(a) => {
                    push_unique(&mut pool.dst_v4, a);
                    push_unique(&mut pool.dst_v6, a.to_ipv6_mapped());
                }
                IpAddr::V6(a) => {
                    push_unique(&mut pool.dst_v6, a);
                    let o = a.octets();
                    push_unique(&mut pool.dst_v4, Ipv4Addr::new(o[12], o[13], o[14], o[15]));
                }
            }
            if let BindTarget::Port { protocol, port } = b.target {
                pool.services.push((b.addr, protocol, port));
                for p in [port, port.wrapping_add(1), port.wrapping_sub(1)] {
                    push_unique(&mut pool.ports, p);
                }
            }
        }
        // The near misses dilute the pool; repeat the exact bound destinations and ports
        // so that most pool picks reach a binding (picks are uniform over the lists).
        for _ in 0..3 {
            for b in &policy.bindings {
                match b.addr {
                    IpAddr::V4(a) => pool.dst_v4.push(a),
                    IpAddr::V6(a) => pool.dst_v6.push(a),
                }
                if let BindTarget::Port { port, .. } = b.target {
                    pool.ports.push(port);
                }
            }
        }
        pool
    }
}

/// Seeded random frame generator; the same seed and pool give the same frames.
pub struct PacketGen {
    rng: StdRng,
    pool: AddressPool,
}

const COMMON_PORTS: [u16; 6] = [22, 53, 80, 443, 8080, 0];

impl PacketGen {
    pub fn new(seed: u64, pool: AddressPool) -> Self {
        PacketGen { rng: StdRng::seed_from_u64(seed), pool }
    }

    pub fn pool(&self) -> &AddressPool {
        &self.pool
    }

    /// The generator's RNG, for tests that want to draw related random values.
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// One random frame (always at least 14 bytes).
    pub fn frame(&mut self) -> Vec<u8> {
        let tags = self.vlan_tags();
        let roll = self.rng.random_range(0..100);
        let (ethertype, payload) = match roll {
            0..8 => self.non_ip(),
            8..52 => (ETH_P_IPV4, self.ipv4_packet()),
            _ => (ETH_P_IPV6, self.ipv6_packet()),
        };
        let mut f = ethernet(&tags, ethertype, &payload);
        match self.rng.random_range(0..8) {
            0 => f = pad_to_min(f),
            1 => {
                // Trailing bytes beyond the IP packet (padding or junk).
                let n = self.rng.random_range(1..=32);
                f.extend((0..n).map(|_| self.rng.random::<u8>()));
            }
            _ => {}
        }
        f
    }

    fn vlan_tags(&mut self) -> Vec<VlanTag> {
        let n = match self.rng.random_range(0..100) {
            0..60 => 0,
            60..82 => 1,
            82..96 => 2,
            _ => 3,
        };
        (0..n)
            .map(|_| VlanTag {
                tpid: if self.rng.random_bool(0.5) { ETH_P_8021Q } else { ETH_P_8021AD },
                tci: self.rng.random(),
            })
            .collect()
    }

    fn non_ip(&mut self) -> (u16, Vec<u8>) {
        match self.rng.random_range(0..3) {
            0 => {
                let oper = self.rng.random_range(1..=2);
                let (s, t) = (self.src_v4(), self.dst_v4());
                (ETH_P_ARP, arp_body(oper, s, t))
            }
            1 => (ETH_P_LLDP, lldp_body()),
            _ => {
                let et = loop {
                    let et: u16 = self.rng.random();
                    if ![ETH_P_IPV4, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD].contains(&et) {
                        break et;
                    }
                };
                (et, self.random_bytes(0..=60))
            }
        }
    }

    fn random_bytes(&mut self, len: std::ops::RangeInclusive<usize>) -> Vec<u8> {
        let n = self.rng.random_range(len);
        (0..n).map(|_| self.rng.random()).collect()
    }

    fn pick<T: Copy>(&mut self, v: &[T], p: f64) -> Option<T> {
        if !v.is_empty() && self.rng.random_bool(p) { Some(v[self.rng.random_range(0..v.len())]) } else { None }
    }

    fn src_v4(&mut self) -> Ipv4Addr {
        let pool = std::mem::take(&mut self.pool.src_v4);
        let a = self.pick(&pool, 0.8).unwrap_or_else(|| Ipv4Addr::from(self.rng.random::<u32>()));
        self.pool.src_v4 = pool;
        a
    }

    fn dst_v4(&mut self) -> Ipv4Addr {
        let pool = std::mem::take(&mut self.pool.dst_v4);
        let a = self.pick(&pool, 0.85).unwrap_or_else(|| Ipv4Addr::from(self.rng.random::<u32>()));
        self.pool.dst_v4 = pool;
        a
    }

    fn src_v6(&mut self) -> Ipv6Addr {
        let pool = std::mem::take(&mut self.pool.src_v6);
        let a = self.pick(&pool, 0.8).unwrap_or_else(|| Ipv6Addr::from(self.rng.random::<u128>()));
        self.pool.src_v6 = pool;
        a
    }

    fn dst_v6(&mut self) -> Ipv6Addr {
        let pool = std::mem::take(&mut self.pool.dst_v6);
        let a = self.pick(&pool, 0.85).unwrap_or_else(|| Ipv6Addr::from(self.rng.random::<u128>()));
        self.pool.dst_v6 = pool;
        a
    }

    fn dport(&mut self) -> u16 {
        let pool = std::mem::take(&mut self.pool.ports);
        let p = self.pick(&pool, 0.75);
        self.pool.ports = pool;
        p.or_else(|| self.pick(&COMMON_PORTS, 0.5)).unwrap_or_else(|| self.rng.random())
    }

    /// Half the time, a source inside an allowlist of an account bound at `dst` (of either
    /// family: the caller keeps its own source when the family differs).
    fn covered_source(&mut self, dst: IpAddr) -> Option<IpAddr> {
        let sources = self.pool.covered.get(&dst).cloned().unwrap_or_default();
        self.pick(&sources, 0.5)
    }

    /// A bound (protocol, port) of `dst`'s family, a quarter of the time.
    fn service(&mut self, v6: bool) -> Option<(IpAddr, u8, u16)> {
        let of_family: Vec<_> = self.pool.services.iter().copied().filter(|s| s.0.is_ipv6() == v6).collect();
        self.pick(&of_family, 0.25)
    }

    /// TCP/UDP/ICMP/other transport bytes; sometimes cut short.
    fn transport(&mut self, protocol: u8, v6: bool, dport: Option<u16>) -> Vec<u8> {
        let sport = self.rng.random();
        let dport = dport.unwrap_or_else(|| self.dport());
        let mut t = match protocol {
            IPPROTO_TCP => tcp_header(sport, dport),
            IPPROTO_UDP => {
                let payload = self.rng.random_range(0..16);
                udp_header(sport, dport, payload)
            }
            IPPROTO_ICMP if !v6 => icmpv4_echo(),
            IPPROTO_ICMPV6 if v6 => {
                let ty = match self.rng.random_range(0..10) {
                    0..4 => self.rng.random_range(ICMPV6_NDP_FIRST..=ICMPV6_NDP_LAST),
                    4..7 => [ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY][self.rng.random_range(0..2)],
                    _ => self.rng.random(),
                };
                icmpv6(ty, 0)
            }
            _ => return self.random_bytes(0..=40),
        };
        if self.rng.random_ratio(1, 8) {
            // Short transport header: the port may or may not still be readable.
            let n = self.rng.random_range(0..t.len());
            t.truncate(n);
        } else {
            t.extend(self.random_bytes(0..=24));
        }
        t
    }

    fn ip_protocol(&mut self, v6: bool) -> u8 {
        match self.rng.random_range(0..100) {
            0..40 => IPPROTO_TCP,
            40..75 => IPPROTO_UDP,
            75..88 => {
                if v6 {
                    IPPROTO_ICMPV6
                } else {
                    IPPROTO_ICMP
                }
            }
            _ => self.rng.random(),
        }
    }

    fn ipv4_packet(&mut self) -> Vec<u8> {
        let (src, mut dst) = (self.src_v4(), self.dst_v4());
        let mut protocol = self.ip_protocol(false);
        let service = self.service(false);
        if let Some((IpAddr::V4(a), proto, _)) = service {
            (dst, protocol) = (a, proto);
        }
        let src = match self.covered_source(IpAddr::V4(dst)) {
            Some(IpAddr::V4(covered)) => covered,
            _ => src,
        };
        let mut h = Ipv4Header::new(src, dst, protocol);
        h.dont_fragment = self.rng.random_bool(0.5);
        if self.rng.random_ratio(1, 3) {
            let words = self.rng.random_range(1..=10);
            h.options = (0..words * 4).map(|_| self.rng.random()).collect();
        }
        match self.rng.random_range(0..100) {
            0..75 => {}
            75..85 => h.more_fragments = true,
            85..92 => {
                h.frag_offset = 1;
                h.more_fragments = self.rng.random_bool(0.5);
            }
            _ => {
                h.frag_offset = self.rng.random_range(2..=0x1fff);
                h.more_fragments = self.rng.random_bool(0.5);
            }
        }
        if self.rng.random_ratio(1, 25) {
            h.version = loop {
                let v = self.rng.random_range(0..16);
                if v != 4 {
                    break v;
                }
            };
        }
        if self.rng.random_ratio(1, 25) {
            h.ihl = Some(self.rng.random_range(0..5));
        } else if self.rng.random_ratio(1, 25) {
            // IHL that disagrees with the options actually present.
            h.ihl = Some(self.rng.random_range(5..16));
        }
        let payload = self.transport(protocol, false, service.map(|s| s.2));
        let correct = IPV4_HDR_LEN + h.options.len() + payload.len();
        h.total_length = self.wrong_length(correct, IPV4_HDR_LEN + h.options.len());
        h.build(&payload)
    }

    /// `None` (correct) most of the time; otherwise too large, too small, or random.
    fn wrong_length(&mut self, correct: usize, header: usize) -> Option<u16> {
        let c = correct as u16;
        match self.rng.random_range(0..100) {
            0..85 => None,
            85..90 => Some(c.saturating_add(self.rng.random_range(1..=64))),
            90..95 => Some(self.rng.random_range(0..=c)),
            95..98 => Some(header as u16),
            _ => Some(self.rng.random()),
        }
    }

    fn ipv6_ext(&mut self) -> Ipv6Ext {
        let len8 = if self.rng.random_bool(0.7) { 0 } else { self.rng.random_range(1..=3) };
        match self.rng.random_range(0..8) {
            0 | 1 => Ipv6Ext::HopByHop { len8 },
            2 | 3 => Ipv6Ext::Routing { len8 },
            4 | 5 => Ipv6Ext::DestOpts { len8 },
            6 => Ipv6Ext::Fragment { offset: 0, more: true },
            _ => Ipv6Ext::Fragment { offset: self.rng.random_range(1..=0x1fff), more: self.rng.random_bool(0.5) },
        }
    }

    fn ipv6_packet(&mut self) -> Vec<u8> {
        let (src, mut dst) = (self.src_v6(), self.dst_v6());
        let mut protocol = self.ip_protocol(true);
        let service = self.service(true);
        if let Some((IpAddr::V6(a), proto, _)) = service {
            (dst, protocol) = (a, proto);
        }
        let src = match self.covered_source(IpAddr::V6(dst)) {
            Some(IpAddr::V6(covered)) => covered,
            _ => src,
        };
        let mut h = Ipv6Header::new(src, dst, protocol);
        let n_ext = match self.rng.random_range(0..100) {
            0..45 => 0,
            45..75 => self.rng.random_range(1..=2),
            75..90 => self.rng.random_range(3..=5),
            _ => self.rng.random_range(6..=7), // around the walker's limit of 6
        };
        h.exts = (0..n_ext).map(|_| self.ipv6_ext()).collect();
        if self.rng.random_ratio(1, 25) {
            h.version = loop {
                let v = self.rng.random_range(0..16);
                if v != 6 {
                    break v;
                }
            };
        }
        let payload = self.transport(protocol, true, service.map(|s| s.2));
        let chain: usize = h.exts.iter().map(|e| e.build(0).len()).sum();
        h.payload_length = self.wrong_length(chain + payload.len(), 0);
        h.build(&payload)
    }
}

impl Iterator for PacketGen {
    type Item = Vec<u8>;
    fn next(&mut self) -> Option<Vec<u8>> {
        Some(self.frame())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{self, Outcome, PolicyParams, decide};

    const NOW: u64 = 100 * 3_600_000_000_000;

    #[test]
    fn packets_builders_parse_as_intended() {
        let (s4, d4): (Ipv4Addr, Ipv4Addr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let (s6, d6): (Ipv6Addr, Ipv6Addr) = ("2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap());
        let ip = |f: &[u8]| match model::parse(f) {
            model::Parsed::Ip(p) => p,
            other => panic!("not IP: {other:?}"),
        };
        let p = ip(&ipv4_tcp(s4, d4, 1000, 443));
        assert_eq!((p.src, p.dst, p.protocol, p.port, p.malformed), (s4.into(), d4.into(), 6, Some(443), false));
        assert_eq!(ipv4_tcp(s4, d4, 1, 2).len(), ETH_MIN_FRAME);
        let p = ip(&ipv4_udp(s4, d4, 1000, 53));
        assert_eq!((p.protocol, p.port, p.malformed), (17, Some(53), false));
        assert_eq!(ip(&ipv4_icmp(s4, d4)).port, None);
        let p = ip(&ipv6_tcp(s6, d6, 1000, 22));
        assert_eq!((p.src, p.dst, p.port, p.malformed), (s6.into(), d6.into(), Some(22), false));
        assert_eq!(ip(&ipv6_udp(s6, d6, 1000, 53)).port, Some(53));
        assert!(ip(&ipv6_icmp(s6, d6, ICMPV6_NEIGHBOR_SOLICIT)).ndp);
        assert!(!ip(&ipv6_icmp(s6, d6, ICMPV6_ECHO_REQUEST)).ndp);
        assert_eq!(ip(&tcp(s6.into(), d6.into(), 1, 80)).port, Some(80));
        assert_eq!(ip(&udp(s4.into(), d4.into(), 1, 80)).port, Some(80));

        // VLAN tags, up to two parse; three are refused.
        let f = ipv4_tcp(s4, d4, 1000, 443);
        assert_eq!(ip(&with_vlans(&f, &[VlanTag::dot1ad(1), VlanTag::dot1q(2)])).port, Some(443));
        let three = [VlanTag::dot1ad(1), VlanTag::dot1q(2), VlanTag::dot1q(3)];
        assert_eq!(model::parse(&with_vlans(&f, &three)), model::Parsed::Unreadable);
        assert_eq!(ethernet(&three, ETH_P_IPV4, &[]), with_vlans(&ethernet(&[], ETH_P_IPV4, &[]), &three));

        assert_eq!(model::parse(&arp_request(s4, d4)), model::Parsed::NonIp);
        assert_eq!(model::parse(&lldp()), model::Parsed::NonIp);
        assert_eq!(arp_body(1, s4, d4).len(), 28);

        // Extension chain with first fragment keeps the port; non-first drops it.
        let mut h = Ipv6Header::new(s6, d6, IPPROTO_UDP);
        h.exts = vec![
            Ipv6Ext::HopByHop { len8: 1 },
            Ipv6Ext::Routing { len8: 0 },
            Ipv6Ext::Fragment { offset: 0, more: true },
            Ipv6Ext::DestOpts { len8: 2 },
        ];
        let f = ethernet(&[], ETH_P_IPV6, &h.build(&udp_header(5, 53, 0)));
        assert_eq!(ip(&f).port, Some(53));
        h.exts[2] = Ipv6Ext::Fragment { offset: 7, more: false };
        let p = ip(&ethernet(&[], ETH_P_IPV6, &h.build(&udp_header(5, 53, 0))));
        assert_eq!((p.port, p.protocol, p.malformed), (None, IPPROTO_DSTOPTS, false));

        // IPv4 options and fragment fields.
        let mut h4 = Ipv4Header::new(s4, d4, IPPROTO_TCP);
        h4.options = vec![1; 12];
        h4.frag_offset = 1;
        let b = h4.build(&[]);
        assert_eq!((b[0], &b[6..8]), (0x48, &[0u8, 1][..]));
        assert!(ip(&ethernet(&[], ETH_P_IPV4, &b)).malformed);
    }

    #[test]
    fn packets_truncations() {
        let f = ipv4_tcp([1, 2, 3, 4].into(), [5, 6, 7, 8].into(), 1, 2);
        let cuts: Vec<Vec<u8>> = truncations(&f).collect();
        assert_eq!(cuts.len(), f.len() - ETH_HDR_LEN);
        for (i, c) in cuts.iter().enumerate() {
            assert_eq!(c.len(), ETH_HDR_LEN + i);
            assert_eq!(&c[..], &f[..c.len()]);
        }
        assert_eq!(truncations(&f[..14]).count(), 0);
    }

    #[test]
    fn packets_generator_is_deterministic() {
        let pool = AddressPool::default();
        let a: Vec<_> = PacketGen::new(7, pool.clone()).take(200).collect();
        let b: Vec<_> = PacketGen::new(7, pool.clone()).take(200).collect();
        let c: Vec<_> = PacketGen::new(8, pool).take(200).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|f| f.len() >= ETH_HDR_LEN));
    }

    /// The generator must reach every outcome of the model, so a differential run over its
    /// frames exercises every rule of the kernel program.
    #[test]
    fn packets_generator_covers_every_outcome() {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut truncated = 0usize;
        for seed in 0..10u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let policy = model::random_policy(&mut rng, &PolicyParams::default(), NOW);
            let mut frames = PacketGen::new(seed, AddressPool::from_policy(&policy));
            for i in 0..5_000 {
                let f = frames.frame();
                let o = decide(&policy, NOW, &f);
                let key = match o {
                    Outcome::Malformed { account: 0 } => "Malformed0".to_string(),
                    Outcome::Malformed { .. } => "MalformedN".to_string(),
                    Outcome::Dropped { reason, .. } => format!("Dropped{reason:?}"),
                    other => format!("{other:?}").split([' ', '{']).next().unwrap().to_string(),
                };
                *counts.entry(key).or_default() += 1;
                // Truncations must never make the model panic.
                if i % 50 == 0 {
                    for t in truncations(&f) {
                        decide(&policy, NOW, &t);
                        truncated += 1;
                    }
                }
            }
        }
        assert!(truncated > 10_000);
        for k in [
            "NonIp",
            "Unreadable",
            "Unbound",
            "Ndp",
            "Malformed0",
            "MalformedN",
            "Passed",
            "WouldDrop",
            "DroppedNotAllowed",
            "DroppedSuspended",
            "DroppedAccountUnset",
        ] {
            let n = counts.get(k).copied().unwrap_or(0);
            assert!(n >= 50, "outcome {k} hit only {n} times: {counts:?}");
        }
        // Most frames should reach an account decision, not just the parser's edges.
        let decided: usize = counts
            .iter()
            .filter(|(k, _)| k.starts_with("Passed") || k.starts_with("WouldDrop") || k.starts_with("Dropped"))
            .map(|(_, n)| n)
            .sum();
        assert!(decided * 5 >= 50_000 * 2, "{counts:?}");
    }
}
