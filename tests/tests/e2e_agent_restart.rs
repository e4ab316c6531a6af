//! The agent loses no XID across its own restarts, through the real kernel (root): records
//! printed while it is down come from the kernel log's backlog (marked `backlog`), once; its
//! spool survives `kill -9` during a collector outage and is delivered when both are back.
//! (Rows of the fault matrix, `gpulse_e2e::soak`.)
#![allow(clippy::print_stderr)] // tests

use std::time::Duration;

use gpulse_e2e::{require_root, soak};

#[test]
fn xids_printed_while_the_agent_is_down_arrive_once_from_the_backlog() {
    if !require_root("xids_printed_while_the_agent_is_down") {
        return;
    }
    let row = soak::agent_kill_restart();
    eprintln!("{}", row.measured);
    assert_eq!(row.ok, Some(true), "{}", row.measured);
}

#[test]
fn an_agent_restart_during_a_collector_outage_delivers_its_spool_after_both_return() {
    if !require_root("an_agent_restart_during_a_collector_outage") {
        return;
    }
    let row = soak::collector_outage(Duration::from_secs(3), true);
    eprintln!("{}", row.measured);
    assert_eq!(row.ok, Some(true), "{}", row.measured);
}
