//! Admission of registry changes: policies and extension modes. Each is a
//! registry record (empty session id, registry-wide sequence number) whose
//! validity checks run when it is applied, live and in recovery.

use macp_wire::storage::{record::Fact, ModePromoted, Record};
use macp_wire::v1::{ModeDescriptor, PolicyDescriptor};

use super::Tx;
use crate::error::{KResult, KernelError};
use crate::io::Identity;

fn require_admin(identity: &Identity) -> KResult<()> {
    if identity.grants.can_manage_mode_registry {
        Ok(())
    } else {
        Err(KernelError::forbidden(format!("{} may not change the mode or policy registry", identity.sender)))
    }
}

fn commit(tx: &mut Tx<'_>, now: i64, fact: Fact) -> KResult<()> {
    let seq = tx.state().registry_seq() + 1;
    tx.commit(Record { session_id: String::new(), seq, at_unix_ms: now, fact: Some(fact) }).map(|_| ())
}

pub(super) fn register_policy(
    tx: &mut Tx<'_>,
    now: i64,
    identity: &Identity,
    mut d: PolicyDescriptor,
) -> KResult<String> {
    require_admin(identity)?;
    tx.state().policies().admit(&d, tx.state().modes())?;
    d.registered_at_unix_ms = now;
    let id = d.policy_id.clone();
    commit(tx, now, Fact::PolicyRegistered(d))?;
    Ok(id)
}

pub(super) fn unregister_policy(tx: &mut Tx<'_>, now: i64, identity: &Identity, id: String) -> KResult<String> {
    require_admin(identity)?;
    commit(tx, now, Fact::PolicyUnregistered(id.clone()))?;
    Ok(id)
}

pub(super) fn register_mode(tx: &mut Tx<'_>, now: i64, identity: &Identity, d: ModeDescriptor) -> KResult<String> {
    require_admin(identity)?;
    let id = d.mode.clone();
    commit(tx, now, Fact::ExtModeRegistered(d))?;
    Ok(id)
}

pub(super) fn unregister_mode(tx: &mut Tx<'_>, now: i64, identity: &Identity, mode: String) -> KResult<String> {
    require_admin(identity)?;
    commit(tx, now, Fact::ExtModeUnregistered(mode.clone()))?;
    Ok(mode)
}

pub(super) fn promote_mode(
    tx: &mut Tx<'_>,
    now: i64,
    identity: &Identity,
    mode: String,
    new_name: String,
) -> KResult<String> {
    require_admin(identity)?;
    let target = tx.state().modes().check_promote(&mode, &new_name).map_err(KernelError::invalid)?;
    commit(tx, now, Fact::ModePromoted(ModePromoted { mode, promoted_mode_name: new_name }))?;
    Ok(target)
}
