//! Packet parsing: just enough of each header to find the source, the destination and the
//! destination port. Every read is bounds-checked against the frame; a packet that claims
//! more than it carries is marked malformed rather than guessed at.

use aya_ebpf::programs::XdpContext;
use ipaccess_common::{AddrWords, FAMILY_V4, FAMILY_V6, packet::*};

/// What the parser learnt about an IP packet.
pub struct Packet {
    pub family: u64,
    /// Addresses as table key words.
    pub src: AddrWords,
    pub dst: AddrWords,
    /// The transport protocol (after IPv6 extension headers), or the last header reached.
    pub protocol: u8,
    /// TCP/UDP destination port; `None` for other protocols and non-first fragments.
    pub port: Option<u16>,
    /// The destination is known but the rest of the packet is not trustworthy.
    pub malformed: bool,
    /// ICMPv6 neighbour discovery.
    pub ndp: bool,
}

pub enum Frame {
    /// Not IPv4/IPv6 (ARP, LLDP, ...), or too short to be Ethernet at all.
    NonIp,
    /// IP (or VLAN-tagged beyond what we parse) whose destination cannot be read.
    Unreadable,
    Ip(Packet),
}

/// Offsets beyond this are not followed; keeps every offset provably bounded for the
/// verifier (IPv4 options and IPv6 extension headers cannot legitimately go further).
const MAX_HEADER_OFFSET: usize = 4096;

/// A bounds-checked view of `N` bytes at `offset`. One check per header keeps the program
/// simple enough for the verifier to follow every path.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&[u8; N]> {
    let start = ctx.data();
    if offset > MAX_HEADER_OFFSET || start + offset + N > ctx.data_end() {
        return None;
    }
    // SAFETY: the range was checked against the frame just above.
    Some(unsafe { &*((start + offset) as *const [u8; N]) })
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    // SAFETY (all three): `at` plus the width is within the checked header `b`.
    u16::from_be(unsafe { core::ptr::read_unaligned(b.as_ptr().add(at).cast()) })
}

#[inline(always)]
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be(unsafe { core::ptr::read_unaligned(b.as_ptr().add(at).cast()) })
}

#[inline(always)]
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be(unsafe { core::ptr::read_unaligned(b.as_ptr().add(at).cast()) })
}

/// Minimum transport header that must be present to read a port: a whole TCP or UDP
/// header, so that a "tiny first fragment" cannot split the header (RFC 1858).
#[inline(always)]
fn transport_header_len(protocol: u8) -> Option<usize> {
    match protocol {
        IPPROTO_TCP => Some(20),
        IPPROTO_UDP => Some(8),
        _ => None,
    }
}

#[inline(always)]
fn is_extension_header(protocol: u8) -> bool {
    matches!(protocol, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Frame {
    let frame_len = ctx.data_end() - ctx.data();
    let Some(ethernet) = bytes::<ETH_HDR_LEN>(ctx, 0) else {
        return Frame::NonIp;
    };
    let mut ethertype = be16(ethernet, 12);
    let mut offset = ETH_HDR_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(tag) = bytes::<VLAN_HDR_LEN>(ctx, offset) else {
            return Frame::Unreadable;
        };
        ethertype = be16(tag, 2);
        offset += VLAN_HDR_LEN;
    }
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(ctx, offset, frame_len),
        ETH_P_IPV6 => parse_ipv6(ctx, offset, frame_len),
        ETH_P_8021Q | ETH_P_8021AD => Frame::Unreadable,
        _ => Frame::NonIp,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, ip: usize, frame_len: usize) -> Frame {
    let Some(header) = bytes::<IPV4_HDR_LEN>(ctx, ip) else {
        return Frame::Unreadable;
    };
    if header[0] >> 4 != 4 {
        return Frame::Unreadable;
    }
    let protocol = header[9];
    let mut packet = Packet {
        family: FAMILY_V4,
        src: AddrWords::v4(be32(header, 12)),
        dst: AddrWords::v4(be32(header, 16)),
        protocol,
        port: None,
        malformed: false,
        ndp: false,
    };
    let header_len = ((header[0] & 0xf) as usize) * 4;
    let total_len = be16(header, 2) as usize;
    if header_len < IPV4_HDR_LEN || total_len < header_len || ip + total_len > frame_len {
        packet.malformed = true;
        return Frame::Ip(packet);
    }
    let fragment_offset = be16(header, 6) & 0x1fff;
    if let Some(needed) = transport_header_len(protocol) {
        if fragment_offset == 0 {
            match bytes::<4>(ctx, ip + header_len) {
                Some(ports) if header_len + needed <= total_len => packet.port = Some(be16(ports, 2)),
                _ => packet.malformed = true,
            }
        } else if fragment_offset == 1 && protocol == IPPROTO_TCP {
            // A fragment overlapping the TCP header could rewrite its port (RFC 1858).
            packet.malformed = true;
        }
    }
    Frame::Ip(packet)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, ip: usize, frame_len: usize) -> Frame {
    let Some(header) = bytes::<IPV6_HDR_LEN>(ctx, ip) else {
        return Frame::Unreadable;
    };
    if header[0] >> 4 != 6 {
        return Frame::Unreadable;
    }
    let first_next = header[6];
    let payload_len = be16(header, 4);
    let mut packet = Packet {
        family: FAMILY_V6,
        src: AddrWords { hi: be64(header, 8), lo: be64(header, 16) },
        dst: AddrWords { hi: be64(header, 24), lo: be64(header, 32) },
        protocol: first_next,
        port: None,
        malformed: false,
        ndp: false,
    };
    let end = ip + IPV6_HDR_LEN + payload_len as usize;
    if end > frame_len {
        packet.malformed = true;
        return Frame::Ip(packet);
    }
    let mut next = first_next;
    let mut offset = ip + IPV6_HDR_LEN;
    let mut first_fragment = true;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Some(&[following, len_units]) = bytes::<2>(ctx, offset) else {
                    packet.malformed = true;
                    return Frame::Ip(packet);
                };
                let len = (len_units as usize + 1) * 8;
                if offset + len > end {
                    packet.malformed = true;
                    return Frame::Ip(packet);
                }
                next = following;
                offset += len;
            }
            IPPROTO_FRAGMENT => {
                let Some(&[following, _, offset_hi, offset_lo]) = bytes::<4>(ctx, offset) else {
                    packet.malformed = true;
                    return Frame::Ip(packet);
                };
                let fragment = u16::from_be_bytes([offset_hi, offset_lo]);
                if offset + 8 > end {
                    packet.malformed = true;
                    return Frame::Ip(packet);
                }
                next = following;
                offset += 8;
                if fragment >> 3 != 0 {
                    first_fragment = false;
                    break;
                }
            }
            _ => break,
        }
    }
    packet.protocol = next;
    if first_fragment && is_extension_header(next) {
        // More extension headers than we follow: the transport header is out of reach.
        packet.malformed = true;
        return Frame::Ip(packet);
    }
    if !first_fragment {
        return Frame::Ip(packet);
    }
    if let Some(needed) = transport_header_len(next) {
        match bytes::<4>(ctx, offset) {
            Some(ports) if offset + needed <= end => packet.port = Some(be16(ports, 2)),
            _ => packet.malformed = true,
        }
    } else if next == IPPROTO_ICMPV6 {
        // Type, code and checksum: the whole fixed ICMPv6 header.
        match bytes::<4>(ctx, offset) {
            Some(&[kind, ..]) if offset + 4 <= end => packet.ndp = (ICMPV6_NDP_FIRST..=ICMPV6_NDP_LAST).contains(&kind),
            _ => packet.malformed = true,
        }
    }
    Frame::Ip(packet)
}
