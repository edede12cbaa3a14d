//! What every request is checked for before it runs.

use super::Failure;
use crate::{
    policy::{ACCOUNT_ID_RULE, MAX_LABEL, MAX_REASON, MAX_TICKET, check_text},
    protocol::{AllowAdd, AllowLabel, AllowReplace, Command, ErrorCode, Import, OverrideGrant, SetAccountState},
};

/// Longest account id a request may name (new ids are held to the stricter rule in
/// `account_add`; here only that a referenced id could be one that exists).
const MAX_REFERENCED_ID: usize = 256;

/// Checks what every command carries: account ids, free text (labels, tickets, reasons,
/// see [`check_text`]). Addresses are in one form already: every address field is read as
/// the IPv4 address when it arrives IPv4-mapped ([`crate::protocol::parse_address`]).
pub(super) fn canonical(mut command: Command) -> Result<Command, Failure> {
    let bad_id = |id: &str| id.is_empty() || check_text("an account id", id, MAX_REFERENCED_ID).is_err();
    let imported_bad = match &command {
        Command::Import(Import { accounts, .. }) => {
            accounts.iter().any(|a| bad_id(&a.account) || a.parent.as_deref().is_some_and(bad_id))
        }
        _ => false,
    };
    if command.account().is_some_and(bad_id) || imported_bad {
        return Err(Failure::new(ErrorCode::BadRequest, ACCOUNT_ID_RULE));
    }
    let text = |what: &str, value: Option<&str>, max: usize| match value {
        Some(value) => check_text(what, value, max).map_err(|why| Failure::new(ErrorCode::BadRequest, why)),
        None => Ok(()),
    };
    // A label of nothing but spaces is no label: stored as one, it would list as blank and
    // read as a label in JSON. Any other is checked as text.
    let label = |label: &mut Option<String>| {
        if label.as_deref().is_some_and(|l| l.trim().is_empty()) {
            *label = None;
        }
        text("a label", label.as_deref(), MAX_LABEL)
    };
    match &mut command {
        Command::AllowAdd(AllowAdd { label: given, .. }) | Command::AllowLabel(AllowLabel { label: given, .. }) => {
            label(given)?
        }
        // Entries are named as the other errors about them are (`entry N`, within its account).
        Command::AllowReplace(AllowReplace { entries, .. }) => entries
            .iter_mut()
            .enumerate()
            .try_for_each(|(n, e)| label(&mut e.label).map_err(|f| f.prefixed(&format!("entry {}", n + 1))))?,
        Command::Import(Import { accounts, .. }) => accounts.iter_mut().try_for_each(|a| {
            let account = &a.account;
            a.entries.iter_mut().flatten().enumerate().try_for_each(|(n, e)| {
                label(&mut e.label).map_err(|f| f.prefixed(&format!("account {account}: entry {}", n + 1)))
            })
        })?,
        Command::OverrideGrant(OverrideGrant { ticket, reason, .. }) => {
            text("a ticket", Some(ticket), MAX_TICKET)?;
            text("a reason", Some(reason), MAX_REASON)?;
        }
        Command::AccountState(SetAccountState { reason, .. }) => text("a reason", reason.as_deref(), MAX_REASON)?,
        _ => {}
    }
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical_json(request: serde_json::Value) -> Result<Command, (ErrorCode, String)> {
        canonical(serde_json::from_value(request).unwrap()).map_err(|Failure(body)| (body.code, body.message))
    }

    #[test]
    fn a_blank_label_is_no_label() {
        for label in ["", "   ", "\t"] {
            let add = canonical_json(serde_json::json!({"cmd": "allow_add", "account": "a", "cidr": "198.18.0.1",
                                                        "label": label}));
            assert!(matches!(add, Ok(Command::AllowAdd(AllowAdd { label: None, .. }))), "{label:?}: {add:?}");
            let replace = canonical_json(serde_json::json!({"cmd": "allow_replace", "account": "a",
                                                            "entries": [{"cidr": "198.18.0.1", "label": label}]}));
            let Ok(Command::AllowReplace(AllowReplace { entries, .. })) = replace else { panic!("{replace:?}") };
            assert_eq!(entries[0].label, None, "{label:?}");
        }
        let kept = canonical_json(serde_json::json!({"cmd": "allow_label", "account": "a", "cidr": "198.18.0.1",
                                                     "label": " office "}));
        assert!(matches!(kept, Ok(Command::AllowLabel(AllowLabel { label: Some(l), .. })) if l == " office "));
    }

    #[test]
    fn ids_and_text_are_checked_in_every_command() {
        for request in [
            serde_json::json!({"cmd": "allow_list", "account": ""}),
            serde_json::json!({"cmd": "stats", "account": "a\u{1b}[2J"}),
            serde_json::json!({"cmd": "import", "accounts": [{"account": "ok"}, {"account": "x", "parent": "p\nq"}]}),
        ] {
            assert_eq!(canonical_json(request.clone()).unwrap_err().0, ErrorCode::BadRequest, "{request}");
        }
        let hostile = serde_json::json!({"cmd": "allow_add", "account": "a", "cidr": "198.18.0.0/24",
            "label": "office\u{202e}"});
        let (code, message) = canonical_json(hostile).unwrap_err();
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(message.contains("a label"), "{message}");
        let long_ticket = serde_json::json!({"cmd": "override_grant", "account": "a", "cidr": "198.18.0.9",
            "ttl_seconds": 600, "ticket": "t".repeat(MAX_TICKET + 1), "reason": "r"});
        assert!(canonical_json(long_ticket).unwrap_err().1.contains("a ticket"));
    }
}
