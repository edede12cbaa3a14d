//! Bindings: which endpoints (addresses, or protocol and port of an address) belong to
//! which account.

use serde_json::json;

use super::{Failure, Reply, Service, change::audit, now};
use crate::{
    datapath::{self, BindTarget},
    protocol::{BindAdd, BindList, BindRemove, Binding, ErrorCode, Proto},
};

impl Service {
    pub(super) fn bind_add(&self, BindAdd { account, addr, port, proto }: BindAdd, uid: u32) -> Reply<BindAdd> {
        let target = target(port, proto)?;
        self.change_bindings(|tx| {
            let row = tx.add_binding(&account, addr, target, now())?;
            audit(tx, &account, uid, "bind_add", json!({ "addr": addr, "target": describe(target).trim() }))?;
            Ok(row)
        })
    }

    pub(super) fn bind_remove(&self, BindRemove { addr, port, proto }: BindRemove, uid: u32) -> Reply<BindRemove> {
        let target = target(port, proto)?;
        self.change_bindings(|tx| match tx.remove_binding(addr, target)? {
            Some(row) => {
                audit(
                    tx,
                    &row.account,
                    uid,
                    "bind_remove",
                    json!({ "addr": addr, "target": describe(target).trim() }),
                )?;
                Ok(row)
            }
            None => Err(Failure::new(ErrorCode::UnknownBinding, format!("no binding for {addr}{}", describe(target)))),
        })
    }

    pub(super) fn bind_list(&self, _: BindList) -> Reply<BindList> {
        self.read(|tx| Ok(tx.bindings()?))
    }
}

/// A stored binding as the kernel's binding table holds it, for the account in `slot`.
pub(super) fn in_kernel(binding: &Binding, slot: u32) -> datapath::Binding {
    let target = match binding.target {
        Some((proto, port)) => BindTarget::Port { protocol: proto.number(), port },
        None => BindTarget::WholeAddress,
    };
    datapath::Binding { addr: binding.addr, target, account: slot }
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
}
