//! Bindings: which endpoints (addresses, or protocol and port of an address) belong to
//! which account.

use std::collections::BTreeSet;

use serde_json::json;

use super::{Failure, Reply, Service, change::audit, now};
use crate::{
    config,
    datapath::{self, BindTarget},
    protocol::{BindAdd, BindList, BindRemove, Binding, ErrorCode, Proto},
};

impl Service {
    pub(super) fn bind_add(&self, request: BindAdd, uid: u32) -> Reply<BindAdd> {
        let BindAdd { account, addr, port, proto, node } = request;
        let target = target(port, proto)?;
        let node = self.scope(node)?;
        self.change_bindings(&BTreeSet::from([addr]), |tx| {
            let row = tx.add_binding_on(&account, addr, target, node.as_deref(), now())?;
            audit(tx, &account, uid, "bind_add", detail(addr, target, &node))?;
            Ok(row)
        })
    }

    pub(super) fn bind_remove(&self, request: BindRemove, uid: u32) -> Reply<BindRemove> {
        let BindRemove { addr, port, proto, node } = request;
        let target = target(port, proto)?;
        let node = self.scope(node)?;
        let at = BTreeSet::from([addr]);
        self.change_bindings(&at, |tx| match tx.remove_binding_on(addr, target, node.as_deref())? {
            Some(row) => {
                audit(tx, &row.account, uid, "bind_remove", detail(addr, target, &node))?;
                Ok(row)
            }
            None => {
                // Say where the endpoint is bound when it is, but not in the scope named.
                let elsewhere: Vec<String> = tx
                    .bindings_at(&at)?
                    .into_iter()
                    .filter(|b| b.target == target)
                    .map(|b| b.node.map_or_else(|| "fleet-wide".to_owned(), |n| format!("on node {n}")))
                    .collect();
                let scope = node.as_ref().map_or_else(|| "fleet-wide".to_owned(), |n| format!("on node {n}"));
                let mut message = format!("no binding for {addr}{} {scope}", describe(target));
                if !elsewhere.is_empty() {
                    message += &format!(
                        " (it is bound {}: name that scope with --node, or leave it out)",
                        elsewhere.join(", ")
                    );
                }
                Err(Failure::new(ErrorCode::UnknownBinding, message))
            }
        })
    }

    /// Every binding of the fleet (or of this host), each with its node when it is scoped
    /// to one: a node enforces the fleet-wide ones and its own.
    pub(super) fn bind_list(&self, _: BindList) -> Reply<BindList> {
        self.read(|tx| Ok(tx.bindings()?))
    }

    /// The node a binding request names, checked: a name a node can have, and a fleet to
    /// have nodes in.
    fn scope(&self, node: Option<String>) -> Result<Option<String>, Failure> {
        let Some(node) = node else { return Ok(None) };
        if !config::node_name_ok(&node) {
            return Err(Failure::new(ErrorCode::BadRequest, format!("node {node:?}: {}", config::NODE_NAME_RULE)));
        }
        if self.fleet().is_none() {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                "bindings scoped to a node need a fleet ([cluster] in the daemon's configuration); on a single \
                 host, leave --node out",
            ));
        }
        Ok(Some(node))
    }
}

/// The bindings enforced by the node named `node` (`None`: a host outside any fleet), as
/// the kernel's binding table holds them: fleet-wide ones and those scoped to this node.
/// Every path that writes the kernel's binding table goes through here, so a binding of
/// another node never reaches this one's kernel. `slot` gives an account's kernel slot;
/// bindings of accounts without one are left out.
pub(super) fn for_kernel(
    bindings: &[Binding],
    node: Option<&str>,
    slot: impl Fn(&str) -> Option<u32>,
) -> Vec<datapath::Binding> {
    let mut out: Vec<(&Binding, datapath::Binding)> = Vec::with_capacity(bindings.len());
    for b in bindings.iter().filter(|b| b.node.is_none() || b.node.as_deref() == node) {
        let Some(slot) = slot(&b.account) else { continue };
        // Fleet-wide and node-scoped bindings of one endpoint are refused together, but etcd
        // can be written by hand: then this node's own binding wins (the list is sorted by
        // endpoint, fleet-wide first).
        if let Some((last, _)) = out.last()
            && last.addr == b.addr
            && last.target == b.target
        {
            out.pop();
        }
        out.push((b, in_kernel(b, slot)));
    }
    out.into_iter().map(|(_, k)| k).collect()
}

/// A stored binding as the kernel's binding table holds it, for the account in `slot`.
fn in_kernel(binding: &Binding, slot: u32) -> datapath::Binding {
    let target = match binding.target {
        Some((proto, port)) => BindTarget::Port { protocol: proto.number(), port },
        None => BindTarget::WholeAddress,
    };
    datapath::Binding { addr: binding.addr, target, account: slot }
}

fn detail(addr: std::net::IpAddr, target: Option<(Proto, u16)>, node: &Option<String>) -> serde_json::Value {
    let mut detail = json!({ "addr": addr, "target": describe(target).trim() });
    if let Some(node) = node {
        detail["node"] = json!(node);
    }
    detail
}

/// A port binding's (protocol, port): `tcp` when only a port is given; a protocol without a
/// port, or port 0, is refused rather than read as "the whole address".
fn target(port: Option<u16>, proto: Option<Proto>) -> Result<Option<(Proto, u16)>, Failure> {
    match (port, proto) {
        (Some(0), _) => Err(Failure::new(ErrorCode::BadRequest, "port 0 cannot be bound")),
        (None, Some(_)) => Err(Failure::new(
            ErrorCode::BadRequest,
            "a protocol needs a port; leave both out to bind the whole address",
        )),
        (Some(port), proto) => Ok(Some((proto.unwrap_or(Proto::Tcp), port))),
        (None, None) => Ok(None),
    }
}

fn describe(target: Option<(Proto, u16)>) -> String {
    match target {
        Some((proto, port)) => format!(" {proto} port {port}"),
        None => " (whole address)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_alone_is_tcp_and_odd_targets_are_refused() {
        assert_eq!(target(Some(443), None).ok(), Some(Some((Proto::Tcp, 443))));
        assert_eq!(target(Some(53), Some(Proto::Udp)).ok(), Some(Some((Proto::Udp, 53))));
        assert_eq!(target(None, None).ok(), Some(None));
        assert!(target(Some(0), Some(Proto::Tcp)).is_err());
        assert!(target(None, Some(Proto::Udp)).is_err(), "a protocol alone is not the whole address");
        assert_eq!(describe(Some((Proto::Udp, 53))), " udp port 53");
    }

    /// The kernel gets the fleet-wide bindings and this node's own, never another node's;
    /// outside a fleet only fleet-wide ones (a store once a fleet node's may hold others).
    #[test]
    fn the_kernel_takes_fleet_wide_bindings_and_this_nodes_own() {
        let binding = |addr: &str, port: Option<u16>, node: Option<&str>| Binding {
            account: "acme".into(),
            addr: addr.parse().unwrap(),
            target: port.map(|p| (Proto::Tcp, p)),
            created_at: 0,
            node: node.map(str::to_owned),
        };
        // As the store lists them: by endpoint, fleet-wide first.
        let all = [
            binding("198.18.0.1", None, None),
            binding("198.18.0.2", Some(443), Some("mx-a")),
            binding("198.18.0.2", Some(443), Some("mx-b")),
            binding("198.18.0.3", None, None),
            binding("198.18.0.3", None, Some("mx-b")),
            binding("198.18.0.4", None, Some("nobody-here")),
        ];
        let addrs = |node: Option<&str>| -> Vec<String> {
            for_kernel(&all, node, |_| Some(7)).iter().map(|b| format!("{} {:?}", b.addr, b.target)).collect()
        };
        let port = |addr: &str| format!("{addr} {:?}", BindTarget::Port { protocol: 6, port: 443 });
        let whole = |addr: &str| format!("{addr} {:?}", BindTarget::WholeAddress);
        assert_eq!(addrs(Some("mx-a")), [whole("198.18.0.1"), port("198.18.0.2"), whole("198.18.0.3")]);
        assert_eq!(addrs(Some("mx-b")), [whole("198.18.0.1"), port("198.18.0.2"), whole("198.18.0.3")]);
        assert_eq!(addrs(Some("mx-c")), [whole("198.18.0.1"), whole("198.18.0.3")]);
        assert_eq!(addrs(None), [whole("198.18.0.1"), whole("198.18.0.3")]);
        // An account without a kernel slot (not applied yet) binds nothing.
        assert!(for_kernel(&all, Some("mx-b"), |_| None).is_empty());
    }
}
