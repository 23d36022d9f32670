//! The mode registry: built-in modes plus extensions registered at run time.
//!
//! Standards-track modes are served by ListModes, extensions by ListExtModes.
//! The `macp.mode.*` namespace is reserved for standards-track modes, and
//! built-ins can be neither removed nor replaced.

use std::collections::BTreeMap;
use std::sync::Arc;

use macp_wire::v1::ModeDescriptor;

use super::passthrough::PassthroughMode;
use super::Mode;

/// The seed's name for multi_round, accepted as a deprecated alias of
/// `ext.multi_round.v1` and never advertised (DECISIONS 8).
pub const MULTI_ROUND_ALIAS: &str = "macp.mode.multi_round.v1";
const MULTI_ROUND: &str = "ext.multi_round.v1";
const RESERVED_PREFIX: &str = "macp.mode.";

/// One registered mode.
#[derive(Clone, Debug)]
pub struct ModeEntry {
    /// The implementation.
    pub mode: Arc<dyn Mode>,
    /// Its descriptor (for extensions, as registered; `mode` is the key).
    pub descriptor: ModeDescriptor,
    /// Compiled in: cannot be unregistered.
    pub builtin: bool,
    /// Listed by ListModes rather than ListExtModes.
    pub standards_track: bool,
}

/// All modes available for new sessions.
#[derive(Clone, Debug)]
pub struct ModeRegistry {
    entries: BTreeMap<String, ModeEntry>,
}

impl ModeRegistry {
    /// The built-in modes.
    pub fn with_builtins() -> Self {
        let mut entries = BTreeMap::new();
        for (mode, standards_track) in super::builtin_modes() {
            let descriptor = mode.descriptor();
            entries.insert(descriptor.mode.clone(), ModeEntry { mode, descriptor, builtin: true, standards_track });
        }
        ModeRegistry { entries }
    }

    /// Looks a mode up by id, following the deprecated multi_round alias.
    /// Returns the canonical id with the entry.
    pub fn resolve(&self, mode: &str) -> Option<(&str, &ModeEntry)> {
        let id = if mode == MULTI_ROUND_ALIAS { MULTI_ROUND } else { mode };
        self.entries.get_key_value(id).map(|(k, v)| (k.as_str(), v))
    }

    /// Whether an envelope's `mode` names the mode `canonical`: the id
    /// [`ModeRegistry::resolve`] gives, or `mode` itself when it is not
    /// registered. Only the deprecated alias can resolve to another id, so
    /// anything else is compared without a lookup.
    pub fn binds_to(&self, mode: &str, canonical: &str) -> bool {
        if mode != MULTI_ROUND_ALIAS {
            return mode == canonical;
        }
        self.resolve(mode).map_or(mode, |(c, _)| c) == canonical
    }

    /// Descriptors for ListModes, sorted by id.
    pub fn standards_track(&self) -> Vec<ModeDescriptor> {
        self.entries.values().filter(|e| e.standards_track).map(|e| e.descriptor.clone()).collect()
    }

    /// Descriptors for ListExtModes, sorted by id.
    pub fn extensions(&self) -> Vec<ModeDescriptor> {
        self.entries.values().filter(|e| !e.standards_track).map(|e| e.descriptor.clone()).collect()
    }

    /// Every mode id, sorted (Initialize, the manifest).
    pub fn all_ids(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// Checks a RegisterExtMode request without changing anything.
    pub fn check_register(&self, d: &ModeDescriptor) -> Result<(), String> {
        let id = d.mode.trim();
        if id.is_empty() {
            return Err("mode descriptor needs a non-empty 'mode'".into());
        }
        if id != d.mode {
            return Err("mode id must not have surrounding whitespace".into());
        }
        if id.starts_with(RESERVED_PREFIX) || id == MULTI_ROUND_ALIAS {
            return Err(format!("'{id}' is in the reserved macp.mode.* namespace for standards-track modes"));
        }
        if d.mode_version.trim().is_empty() {
            return Err("mode descriptor needs a non-empty 'mode_version'".into());
        }
        if d.message_types.is_empty() {
            return Err("mode descriptor needs at least one message type".into());
        }
        if d.terminal_message_types.is_empty() {
            return Err("mode descriptor needs terminal_message_types (['Commitment'])".into());
        }
        for t in &d.terminal_message_types {
            if t != "Commitment" {
                return Err(format!(
                    "terminal message type '{t}' is not supported: only 'Commitment' resolves a session"
                ));
            }
            if !d.message_types.contains(t) {
                return Err(format!("terminal message type '{t}' must also be listed in message_types"));
            }
        }
        if self.entries.contains_key(id) {
            return Err(format!("mode '{id}' is already registered"));
        }
        Ok(())
    }

    /// Registers a passthrough extension (after [`Self::check_register`]).
    pub fn register(&mut self, d: ModeDescriptor) {
        let mode: Arc<dyn Mode> = Arc::new(PassthroughMode::new(d.clone()));
        self.entries.insert(d.mode.clone(), ModeEntry { mode, descriptor: d, builtin: false, standards_track: false });
    }

    /// Checks an UnregisterExtMode request.
    pub fn check_unregister(&self, mode: &str) -> Result<(), String> {
        match self.entries.get(mode) {
            None => Err(format!("mode '{mode}' is not registered")),
            Some(e) if e.builtin => Err(format!("mode '{mode}' is built in and cannot be unregistered")),
            Some(e) if e.standards_track => Err(format!("mode '{mode}' is standards-track and cannot be unregistered")),
            Some(_) => Ok(()),
        }
    }

    /// Removes an extension (after [`Self::check_unregister`]). Sessions
    /// already bound to it keep running.
    pub fn unregister(&mut self, mode: &str) {
        self.entries.remove(mode);
    }

    /// Checks a PromoteMode request; returns the final id.
    pub fn check_promote(&self, mode: &str, new_name: &str) -> Result<String, String> {
        let entry = self.entries.get(mode).ok_or_else(|| format!("mode '{mode}' is not registered"))?;
        if entry.standards_track {
            return Err(format!("mode '{mode}' is already standards-track"));
        }
        if entry.builtin {
            return Err(format!("built-in extension '{mode}' cannot be promoted"));
        }
        let target = if new_name.is_empty() { mode } else { new_name };
        if target.starts_with(RESERVED_PREFIX) {
            return Err(format!(
                "'{target}' is in the reserved macp.mode.* namespace; promotion into it needs the RFC process"
            ));
        }
        if target != mode && self.entries.contains_key(target) {
            return Err(format!("mode '{target}' is already registered"));
        }
        Ok(target.to_string())
    }

    /// Promotes an extension (after [`Self::check_promote`]).
    pub fn promote(&mut self, mode: &str, target: &str) {
        if let Some(mut entry) = self.entries.remove(mode) {
            entry.standards_track = true;
            entry.descriptor.mode = target.to_string();
            entry.mode = Arc::new(PassthroughMode::new(entry.descriptor.clone()));
            self.entries.insert(target.to_string(), entry);
        }
    }

    /// Finds the implementation for a session bound to `mode`, even if the
    /// extension was unregistered since: its sessions run to the end as
    /// passthrough sessions.
    pub fn for_restore(&self, mode: &str) -> Arc<dyn Mode> {
        match self.resolve(mode) {
            Some((_, e)) => e.mode.clone(),
            None => Arc::new(PassthroughMode::new(ModeDescriptor { mode: mode.to_string(), ..Default::default() })),
        }
    }
}

impl ModeRegistry {
    /// Extensions registered at run time, with whether each was promoted
    /// (checkpoints must carry them: replaying the log tail needs them).
    pub fn dynamic_entries(&self) -> impl Iterator<Item = (&ModeDescriptor, bool)> {
        self.entries.values().filter(|e| !e.builtin).map(|e| (&e.descriptor, e.standards_track))
    }

    /// Re-adds a run-time extension from a checkpoint.
    pub fn restore_dynamic(&mut self, d: ModeDescriptor, standards_track: bool) {
        let mode: Arc<dyn Mode> = Arc::new(PassthroughMode::new(d.clone()));
        self.entries.insert(d.mode.clone(), ModeEntry { mode, descriptor: d, builtin: false, standards_track });
    }
}
