//! Wire constants the kernel parser and the user-space reference model both use.

pub const ETH_HDR_LEN: usize = 14;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const VLAN_HDR_LEN: usize = 4;
/// VLAN tags parsed; a frame with more is dropped as malformed rather than passed unread.
pub const MAX_VLAN_TAGS: usize = 2;

pub const IPV4_HDR_LEN: usize = 20;
pub const IPV6_HDR_LEN: usize = 40;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// IPv6 extension headers walked before giving up on finding the transport header.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

/// ICMPv6 types of neighbour discovery (router/neighbour solicitation and advertisement,
/// redirect). They always pass: dropping them would break address resolution for the host.
pub const ICMPV6_NDP_FIRST: u8 = 133;
pub const ICMPV6_NDP_LAST: u8 = 137;
