//! Asks the kernel, over rtnetlink, where an interface runs its XDP program: a bpf_link
//! does not say whether it was attached in the driver or in the generic path, and a link
//! reused after a restart was attached by an earlier process.

use std::io;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use serde::{Deserialize, Serialize};

/// Where on an interface the XDP program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum XdpPath {
    /// In the driver, before the kernel allocates a socket buffer (fast).
    Native,
    /// In the generic network stack path, after the socket buffer exists (slower).
    Generic,
    /// On the network card itself.
    Offloaded,
    /// Programs in more than one of those places.
    Several,
}

impl std::fmt::Display for XdpPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdpPath::Native => "native",
            XdpPath::Generic => "generic",
            XdpPath::Offloaded => "offloaded",
            XdpPath::Several => "several",
        })
    }
}

/// The XDP path `iface` runs a program in, in this process's network namespace; `None` when
/// no XDP program is attached to it.
pub fn xdp_path(iface: &str) -> io::Result<Option<XdpPath>> {
    let mut request = LinkMessage::default();
    request.attributes.push(LinkAttribute::IfName(iface.to_string()));
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetLink(request));
    request.header.flags = NLM_F_REQUEST;
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&bytes, 0)?;
    let (reply, _) = socket.recv_from_full()?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink reply: {e}")))?;
    let link = match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => link,
        NetlinkPayload::Error(e) => return Err(e.to_io()),
        other => {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected rtnetlink reply {other:?}")));
        }
    };
    let attached = link.attributes.iter().find_map(|attribute| match attribute {
        LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
            LinkXdp::Attached(how) => Some(*how),
            _ => None,
        }),
        _ => None,
    });
    Ok(match attached {
        None | Some(XdpAttached::None) => None,
        Some(XdpAttached::Driver) => Some(XdpPath::Native),
        Some(XdpAttached::SocketBuffer) => Some(XdpPath::Generic),
        Some(XdpAttached::Hardware) => Some(XdpPath::Offloaded),
        Some(_) => Some(XdpPath::Several),
    })
}
