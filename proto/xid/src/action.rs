//! What to do about a GPU: NVIDIA's resolution buckets (the XID catalog's immediate actions)
//! and gpulse's own for rules judged from NVML readings. One value per action carries its wire
//! name (`HealthReason.action`) and its "what to do" line, which the verdict rules, the catalog,
//! MCP (`gpu_health`'s `what_to_do`) and the CLI all take from here.
use std::fmt;

use serde::Serialize;

macro_rules! actions {
    ($($(#[$doc:meta])* $variant:ident = $name:literal: $todo:literal,)+) => {
        /// An action; [`Action::name`] is NVIDIA's bucket name where NVIDIA has one.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
        pub enum Action {
            $($(#[$doc])* $variant,)+
        }

        impl Action {
            /// Every action, in the order of this table.
            pub const ALL: &'static [Action] = &[$(Action::$variant,)+];

            /// The name on the wire and in NVIDIA's catalog (`RESET_GPU`).
            pub fn name(self) -> &'static str {
                match self {
                    $(Action::$variant => $name,)+
                }
            }

            /// What an operator does, in one line.
            pub fn what_to_do(self) -> &'static str {
                match self {
                    $(Action::$variant => $todo,)+
                }
            }
        }
    };
}

actions! {
    /// The application failed; the GPU is fine.
    RestartApp = "RESTART_APP": "restart the application; the GPU itself is fine",
    ResetGpu = "RESET_GPU": "drain the GPU, then reset it (nvidia-smi -r) or reboot the node",
    RestartBm = "RESTART_BM": "drain the node and reboot it",
    RestartVm = "RESTART_VM": "restart the virtual machine",
    /// Hardware: also the action of an escalated reason.
    ContactSupport = "CONTACT_SUPPORT": "take the GPU out of service and contact NVIDIA support (hardware inspection, RMA)",
    WorkflowNvlinkErr = "WORKFLOW_NVLINK_ERR": "follow NVIDIA's NVLink error workflow: check the links and NVSwitches, then reset the GPU",
    WorkflowNvlink5Err = "WORKFLOW_NVLINK5_ERR": "follow NVIDIA's NVLink5 error workflow: check the links and NVSwitches, then reset the GPU",
    CheckMechanicals = "CHECK_MECHANICALS": "check cooling, airflow, fans and power delivery",
    /// gpulse's, for the power-violation rule.
    CheckPower = "CHECK_POWER": "check the power limit and the power supply",
    CheckUvm = "CHECK_UVM": "check the CUDA unified memory driver (nvidia-uvm) and the application",
    UpdateSwfw = "UPDATE_SWFW": "update the driver and the GPU firmware",
    /// gpulse's, for a failed NVSwitch fabric registration.
    RestartFm = "RESTART_FM": "restart NVIDIA Fabric Manager and check the NVSwitch fabric",
    /// gpulse's, for a GPU busy without power or memory traffic (a hang suspect).
    CheckWorkload = "CHECK_WORKLOAD": "the GPU is busy without drawing power or moving memory: look for a hung kernel or a stalled collective in the job, then restart it",
    /// XID 154's drain-P2P recovery.
    DrainP2p = "DRAIN_P2P": "drain peer-to-peer traffic, then reset the GPU",
    /// XID 48's workflow (a double-bit error: it ends in a GPU reset, and a remap on Ampere+).
    WorkflowXid48 = "WORKFLOW_XID_48": "follow NVIDIA's XID 48 workflow: drain the GPU and reset it (a row remap follows on Ampere and later)",
    /// XID 45 follows another XID: act on that one.
    WorkflowXid45 = "WORKFLOW_XID_45": "act on the XID this one follows (XID 45 reports the channels another error ended)",
    /// XID 154 carries the recovery the GPU needs.
    Xid154 = "XID_154": "do what the XID's recovery action says",
    Ignore = "IGNORE": "nothing: informational",
}

impl Action {
    /// The action of this name, if it is one of the table's.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|a| a.name() == name)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The line for an action name as it stands on the wire (older collectors, or a catalog action
/// this build lacks, get a pointer to NVIDIA's catalog).
pub fn what_to_do(name: &str) -> &'static str {
    Action::from_name(name).map_or(
        "see NVIDIA's Xid catalog for this action",
        Action::what_to_do,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for a in Action::ALL {
            assert!(seen.insert(a.name()), "{a} twice");
            assert_eq!(Action::from_name(a.name()), Some(*a));
            assert!(!a.what_to_do().is_empty());
        }
        assert_eq!(Action::from_name("NOPE"), None);
        assert!(what_to_do("NOPE").contains("Xid catalog"));
    }

    /// Every immediate action the catalog names is an action here: a catalog row with a new
    /// bucket fails until the bucket is given its wording.
    #[test]
    fn every_catalog_action_is_in_the_table() {
        for x in crate::catalog::all() {
            if !x.immediate_action.is_empty() {
                assert!(
                    Action::from_name(x.immediate_action).is_some(),
                    "XID {}: {} is not an Action",
                    x.code,
                    x.immediate_action
                );
            }
        }
    }
}
