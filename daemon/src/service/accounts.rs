//! Accounts: creating, showing, listing, removing, their state and mode, and bulk import.

use std::collections::{HashMap, HashSet};

use log::info;
use serde_json::json;

use super::{
    Failure, Reply, Service,
    allowlist::{distinct_entries, entry_limit},
    change::{Touched, audit, existing, policy_from_store},
    lockout, now,
};
use crate::{
    policy::{ACCOUNT_ID_RULE, AccountPolicy, effective_state, valid_account_id},
    protocol::{
        Account, AccountAdd, AccountDetails, AccountList, AccountMode, AccountRemove, AccountShow, AccountState,
        ErrorCode, Import, ImportAccount, Imported, ListedAccount, Mode, Removed, SetAccountState,
    },
    store::Tx,
};

impl Service {
    pub(super) fn account_add(&self, request: AccountAdd, uid: u32) -> Reply<AccountAdd> {
        let AccountAdd { account, parent, unconfirmed } = request;
        if !valid_account_id(&account) {
            return Err(Failure::new(ErrorCode::BadRequest, format!("{ACCOUNT_ID_RULE}; {account:?} is not one")));
        }
        let state = if unconfirmed { AccountState::Unconfirmed } else { AccountState::Active };
        // IP restriction is opt-in: a new account starts in mode `off`.
        self.change(&account, |tx| {
            let row = tx.add_account(&account, parent.as_deref(), state, Mode::Off, now())?;
            audit(tx, &account, uid, "account_add", json!({ "parent": parent, "state": state }))?;
            Ok((row.clone(), row))
        })
    }

    pub(super) fn account_show(&self, AccountShow { account }: AccountShow) -> Reply<AccountShow> {
        self.read(|tx| {
            let row = existing(tx, &account)?;
            let listed = listed(&self.accounts.read().expect("cache lock"), row);
            let bindings = tx.bindings_of(&account)?;
            let sets = tx.set_refs(&account)?.into_iter().map(super::sets::as_reference).collect();
            Ok(AccountDetails { account: listed, entries: tx.entries(&account)?, bindings, sets })
        })
    }

    pub(super) fn account_list(&self, _: AccountList) -> Reply<AccountList> {
        let mut rows = self.read(|tx| Ok(tx.accounts()?))?.into_iter().peekable();
        // The cache's lock a part at a time: all 100,000 accounts at once held it for about
        // 20 ms, and a change waiting for it holds up the checks that come after it.
        let mut listed_rows = Vec::with_capacity(rows.len());
        while rows.peek().is_some() {
            let cache = self.accounts.read().expect("cache lock");
            listed_rows.extend(rows.by_ref().take(LIST_PART).map(|row| listed(&cache, row)));
        }
        Ok(listed_rows)
    }

    /// Removes an account (and, with `recursive`, its sub-users, deepest first) from the
    /// store and the kernel.
    pub(super) fn account_remove(&self, request: AccountRemove, uid: u32) -> Reply<AccountRemove> {
        let AccountRemove { account, recursive } = request;
        let removed = self.remove_accounts(&account, |tx| {
            existing(tx, &account)?;
            let below = tx.descendants(&account)?;
            if !below.is_empty() && !recursive {
                return Err(Failure::new(
                    ErrorCode::HasSubUsers,
                    format!(
                        "{account} has sub-users ({}); remove them first, or repeat with --recursive to remove them \
                         too",
                        below.join(", ")
                    ),
                ));
            }
            let removed: Vec<String> = below.into_iter().rev().chain([account.clone()]).collect();
            for id in &removed {
                let bindings = tx.binding_count(id)?;
                audit(tx, id, uid, "account_remove", json!({ "removed_with": account, "bindings": bindings }))?;
            }
            Ok(removed)
        })?;
        Ok(Removed { removed })
    }

    pub(super) fn account_state(&self, request: SetAccountState, uid: u32) -> Reply<SetAccountState> {
        let SetAccountState { account, state, reason } = request;
        self.change(&account, |tx| {
            let was = existing(tx, &account)?.state;
            tx.set_state(&account, state, reason.as_deref())?;
            audit(tx, &account, uid, "state", json!({ "state": state, "was": was, "reason": reason }))?;
            let row = existing(tx, &account)?;
            Ok((row.clone(), row))
        })
    }

    pub(super) fn account_mode(&self, request: AccountMode, uid: u32) -> Reply<AccountMode> {
        let AccountMode { account, mode, client_ip, force } = request;
        self.change(&account, |tx| {
            let row = existing(tx, &account)?;
            let before = policy_from_store(tx, &row, now())?;
            let after = AccountPolicy { mode, ..before.clone() };
            lockout::guard(tx, self, &account, uid, client_ip, force, &before, &after)?;
            tx.set_mode(&account, mode)?;
            audit(tx, &account, uid, "mode", json!({ "mode": mode, "was": row.mode, "forced": force }))?;
            let row = existing(tx, &account)?;
            Ok((row.clone(), row))
        })
    }

    /// Creates or updates every account of the batch, with its allowlist, in one change.
    pub(super) fn import(&self, Import { accounts, force }: Import, uid: u32) -> Reply<Import> {
        let mut seen = HashSet::with_capacity(accounts.len());
        if let Some(twice) = accounts.iter().find(|a| !seen.insert(a.account.as_str())) {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("account {} appears twice in the import", twice.account),
            ));
        }
        let max_entries = self.max_entries();
        if !force {
            // The lockout guard reads the accounts' recent sign-ins: those answered before the
            // import must be in the store (one write for the batch, not one per account).
            self.activity.flush();
        }
        let imported = self.change_accounts(|tx| {
            let at = now();
            let mut totals = Imported::default();
            let mut rows = Vec::with_capacity(accounts.len());
            for import in accounts {
                let id = import.account.clone();
                let (touched, entries) =
                    // The client maps the account back to its line in the file.
                    import_one(tx, self, import, uid, at, max_entries, force)
                        .map_err(|f| f.prefixed(&format!("account {id}")))?;
                totals.created += u64::from(matches!(touched, Touched::Created(..)));
                totals.entries += entries as u64;
                rows.push(touched);
            }
            totals.accounts = rows.len() as u64;
            Ok((rows, totals))
        })?;
        // Logged once it is committed and enforced, not when it is merely made.
        info!(
            "import by uid {uid}: {} accounts ({} new), {} allowlist entries",
            imported.accounts, imported.created, imported.entries
        );
        Ok(imported)
    }
}

/// Accounts listed under one taking of the cache's read lock.
const LIST_PART: usize = 4_096;

/// An account row as lists show it: with the state that takes effect, which differs from
/// its own when an ancestor is banned or terminated.
fn listed(cache: &HashMap<String, AccountPolicy>, row: Account) -> ListedAccount {
    let effective_state = match cache.get(&row.id) {
        Some(policy) => effective_state(|id| cache.get(id), policy).0,
        // Written since the cache was read: its own state is all there is to go on.
        None => row.state.into(),
    };
    ListedAccount { account: row, effective_state }
}

/// One account of an import: created or updated, its allowlist replaced when given.
/// Returns the account as touched, and how many entries the import gave it. An allowlist
/// longer than `max_entries` is refused (see [`entry_limit`]); so, unless `force`, is a new
/// mode or allowlist of an existing account that the lockout guard refuses, as it would
/// refuse the same change made with `account mode` or `allow replace`.
fn import_one(
    tx: &Tx,
    others: &dyn lockout::OtherNodes,
    import: ImportAccount,
    uid: u32,
    at: i64,
    max_entries: u32,
    force: bool,
) -> Result<(Touched, usize), Failure> {
    let id = import.account.as_str();
    let (mut row, created) = match tx.account(id)? {
        Some(row) => {
            if import.parent.is_some() && import.parent != row.parent {
                return Err(Failure::new(
                    ErrorCode::BadRequest,
                    "it exists with another parent; a parent cannot be changed",
                ));
            }
            (row, false)
        }
        None => {
            if !valid_account_id(id) {
                return Err(Failure::new(ErrorCode::BadRequest, ACCOUNT_ID_RULE));
            }
            let state = import.state.unwrap_or(AccountState::Active);
            (tx.add_account(id, import.parent.as_deref(), state, import.mode.unwrap_or(Mode::Off), at)?, true)
        }
    };
    // An existing account's policy as it is, where the import may shut someone out.
    let guarded = !created && !force && (import.mode.is_some() || import.entries.is_some());
    let before = if guarded { Some(policy_from_store(tx, &row, at)?) } else { None };
    if let Some(state) = import.state.filter(|&s| s != row.state) {
        tx.set_state(id, state, Some("import"))?;
        (row.state, row.state_reason) = (state, Some("import".into()));
    }
    if let Some(mode) = import.mode.filter(|&m| m != row.mode) {
        tx.set_mode(id, mode)?;
        row.mode = mode;
    }
    let replaced = import.entries.map(distinct_entries).transpose()?.map(|(wanted, _)| wanted);
    if let Some(wanted) = &replaced {
        let before = if created { 0 } else { tx.entry_count(id)? };
        // The whole batch is one change: refused here, none of its accounts is imported.
        entry_limit(max_entries, id, before, wanted.len() as u64)?;
    }
    match &replaced {
        Some(wanted) if created => tx.add_entries(id, wanted, uid, at)?,
        Some(wanted) => tx.replace_entries(id, wanted, uid, at)?,
        None => {}
    }
    if let Some(before) = before {
        let after = policy_from_store(tx, &row, at)?;
        lockout::guard(tx, others, id, uid, None, false, &before, &after)?;
    }
    let entries = replaced.as_ref().map_or(0, Vec::len);
    let detail = ImportAudit {
        action: "import",
        created,
        entries: replaced.as_ref().map(Vec::len),
        mode: import.mode,
        state: import.state,
        forced: force && !created,
        uid,
    };
    audit_import(tx, id, &detail, at)?;
    let touched = if created {
        Touched::Created(
            row,
            replaced.map(|wanted| wanted.into_iter().map(|(cidr, _)| cidr).collect()).unwrap_or_default(),
        )
    } else {
        Touched::Changed(row)
    };
    Ok((touched, entries))
}

/// The audit record of one imported account, in the same form as [`audit`] writes (keys in
/// its order), serialized straight to text: an import writes one per account.
#[derive(serde::Serialize)]
struct ImportAudit {
    action: &'static str,
    created: bool,
    entries: Option<usize>,
    mode: Option<Mode>,
    state: Option<AccountState>,
    /// Sent with `force`: the lockout guard was not asked.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    forced: bool,
    uid: u32,
}

fn audit_import(tx: &Tx, account: &str, detail: &ImportAudit, at: i64) -> Result<(), Failure> {
    // Debug level: the import's summary line says what happened; build its fields only
    // when they would be written.
    if log::log_enabled!(target: crate::logging::AUDIT_TARGET, log::Level::Debug) {
        let value = serde_json::to_value(detail).expect("an audit record serializes");
        crate::logging::audit(account, detail.uid, detail.action, &value);
    }
    let text = serde_json::to_string(detail).expect("an audit record serializes");
    Ok(tx.add_audit(at, account, detail.action, &text)?)
}
