//! Bringing a kernel's registries to a wanted state by recording the
//! changes that get it there.
//!
//! A cluster node runs one kernel per shard it serves, and each kernel
//! records its own registry changes in its own log (see
//! [`crate::policies_dir`] for why registries are recorded rather than
//! injected). [`WantedRegistries`] is what every one of them should hold:
//! the policies and run-time extension modes of the cluster's registry
//! table (and, with `MACP_POLICIES_DIR`, the directory's policies).
//! [`WantedRegistries::plan`] is the list of registry inputs that takes
//! one kernel there; it is empty when the kernel already agrees, so
//! syncing is idempotent and a kernel loaded later catches up the same way.

use macp_kernel::{Identity, Input, Kernel};
use macp_wire::v1::{ModeDescriptor, PolicyDescriptor};

use crate::policies_dir::plan_descriptors;

/// The registries every kernel of a cluster node should hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WantedRegistries {
    /// The registry table's version this was read at.
    pub version: i64,
    /// Every policy besides the built-in default.
    pub policies: Vec<PolicyDescriptor>,
    /// Every run-time extension mode, and whether it was promoted to
    /// standards-track.
    pub modes: Vec<(ModeDescriptor, bool)>,
}

impl WantedRegistries {
    /// The registry inputs (from `operator`) that make `kernel`'s
    /// registries equal these: stale policies and extensions unregistered
    /// first, then the missing ones registered (and promoted, for a
    /// standards-track one). A promoted mode cannot be unregistered: one
    /// the wanted state no longer has stays (no request can ask for that).
    pub fn plan(&self, kernel: &Kernel, operator: &Identity) -> Vec<Input> {
        let registered: Vec<PolicyDescriptor> = kernel.policies().all().cloned().collect();
        let wanted: Vec<&PolicyDescriptor> = self.policies.iter().collect();
        let mut inputs = plan_descriptors(&registered, &wanted, operator);

        let held: Vec<(&ModeDescriptor, bool)> = kernel.modes().dynamic_entries().collect();
        let wants = |d: &ModeDescriptor, track: bool| self.modes.iter().any(|(w, t)| w == d && *t == track);
        for (d, track) in &held {
            if !track && !wants(d, false) {
                inputs.push(Input::UnregisterExtMode { request: 0, identity: operator.clone(), mode: d.mode.clone() });
            }
        }
        for (d, track) in &self.modes {
            if held.iter().any(|(h, t)| *h == d && t == track) {
                continue;
            }
            if held.iter().any(|(h, t)| h.mode == d.mode && *t) {
                continue; // promoted here already, under other terms: cannot be undone
            }
            inputs.push(Input::RegisterExtMode { request: 0, identity: operator.clone(), descriptor: d.clone() });
            if *track {
                inputs.push(Input::PromoteMode {
                    request: 0,
                    identity: operator.clone(),
                    mode: d.mode.clone(),
                    promoted_mode_name: String::new(),
                });
            }
        }
        inputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies_dir::tests::descriptor as policy;
    use macp_kernel::{Effect, KernelConfig, Reply};

    fn mode(id: &str) -> ModeDescriptor {
        ModeDescriptor {
            mode: id.into(),
            mode_version: "1.0.0".into(),
            message_types: vec!["Note".into(), "Commitment".into()],
            terminal_message_types: vec!["Commitment".into()],
            ..Default::default()
        }
    }

    /// Applies `wanted`'s plan to `kernel`; every step must be accepted.
    fn sync(kernel: &mut Kernel, wanted: &WantedRegistries) -> usize {
        let op = Identity::new("runtime");
        let inputs = wanted.plan(kernel, &op);
        let n = inputs.len();
        for input in inputs {
            for effect in kernel.handle(1, input) {
                if let Effect::Reply { reply: Reply::Registry(Err(e)), .. } = effect {
                    panic!("sync step refused: {e}");
                }
            }
        }
        n
    }

    #[test]
    fn syncing_converges_and_then_plans_nothing() {
        let mut kernel = Kernel::new(KernelConfig::default());
        let mut wanted = WantedRegistries {
            version: 1,
            policies: vec![policy("p.one", "{}"), policy("p.two", "{}")],
            modes: vec![(mode("ext.a.v1"), false), (mode("acme.b.v1"), true)],
        };
        assert_eq!(sync(&mut kernel, &wanted), 5, "two policies, two registrations, one promotion");
        assert_eq!(sync(&mut kernel, &wanted), 0);
        assert!(kernel.modes().standards_track().iter().any(|d| d.mode == "acme.b.v1"));

        // One policy changed, one gone; one mode gone, a new one.
        wanted.policies = vec![policy("p.one", r#"{"voting":{"algorithm":"majority"}}"#)];
        wanted.modes = vec![(mode("acme.b.v1"), true), (mode("ext.c.v1"), false)];
        assert!(sync(&mut kernel, &wanted) > 0);
        assert_eq!(sync(&mut kernel, &wanted), 0);
        let ids: Vec<String> = kernel.policies().all().map(|p| p.policy_id.clone()).collect();
        assert!(ids.contains(&"p.one".to_string()) && !ids.contains(&"p.two".to_string()), "{ids:?}");
        let exts: Vec<String> = kernel.modes().extensions().into_iter().map(|d| d.mode).collect();
        assert!(exts.contains(&"ext.c.v1".to_string()) && !exts.contains(&"ext.a.v1".to_string()), "{exts:?}");
    }

    /// A wanted state drawn from a few ids and two variants of each, so
    /// states overlap, differ in definitions, and drop and add entries.
    fn wanted_state() -> impl proptest::strategy::Strategy<Value = WantedRegistries> {
        use proptest::prelude::*;
        let policies = proptest::collection::btree_map(0u8..4, 0u8..2, 0..4);
        let modes = proptest::collection::btree_map(0u8..3, (0u8..2, any::<bool>()), 0..3);
        (policies, modes).prop_map(|(policies, modes)| WantedRegistries {
            version: 0,
            policies: policies
                .into_iter()
                .map(|(id, v)| policy(&format!("p.{id}"), &format!(r#"{{"_variant":{v}}}"#)))
                .collect(),
            modes: modes
                .into_iter()
                .map(|(id, (v, track))| {
                    let mut d = mode(&format!("ext.m{id}.v1"));
                    d.mode_version = format!("{}.0.0", v + 1);
                    (d, track)
                })
                .collect(),
        })
    }

    proptest::proptest! {
        /// From any registries a kernel can hold, one plan takes it to any
        /// wanted state that keeps the modes it promoted (promotion is
        /// final: no request undoes it): every step accepted, the
        /// registries equal the wanted ones, and the next plan is empty.
        #[test]
        fn one_plan_reaches_any_wanted_state(from in wanted_state(), to in wanted_state()) {
            let mut kernel = Kernel::new(KernelConfig::default());
            sync(&mut kernel, &from);
            let mut to = to;
            for (d, track) in &from.modes {
                if *track {
                    to.modes.retain(|(w, _)| w.mode != d.mode);
                    to.modes.push((d.clone(), true));
                }
            }
            sync(&mut kernel, &to);
            proptest::prop_assert!(to.plan(&kernel, &Identity::new("runtime")).is_empty());
            let mut held: Vec<(String, String)> = kernel
                .policies()
                .all()
                .filter(|p| p.policy_id != macp_kernel::policy::DEFAULT_POLICY_ID)
                .map(|p| (p.policy_id.clone(), p.rules.clone()))
                .collect();
            let mut wanted: Vec<(String, String)> =
                to.policies.iter().map(|p| (p.policy_id.clone(), p.rules.clone())).collect();
            held.sort();
            wanted.sort();
            proptest::prop_assert_eq!(held, wanted);
            let mut held: Vec<(ModeDescriptor, bool)> =
                kernel.modes().dynamic_entries().map(|(d, t)| (d.clone(), t)).collect();
            let mut wanted = to.modes.clone();
            held.sort_by(|a, b| a.0.mode.cmp(&b.0.mode));
            wanted.sort_by(|a, b| a.0.mode.cmp(&b.0.mode));
            proptest::prop_assert_eq!(held, wanted);
        }
    }
}
