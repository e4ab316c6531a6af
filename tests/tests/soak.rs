//! The short form of the fault matrix (`cargo xtask soak` runs the full one): the rows not
//! already run by their own tests, each a test that fails when what must hold did not.
#![allow(clippy::print_stderr)] // tests

use std::time::Duration;

use gpulse_e2e::soak::{self, Row};

fn check(row: Row) {
    eprintln!("{}", soak::table(std::slice::from_ref(&row)));
    assert_ne!(row.ok, Some(false), "{}", row.measured);
}

#[test]
fn kill9_of_the_collector_in_a_loop_loses_and_duplicates_nothing() {
    check(soak::kill9_loop(
        Duration::from_secs(4),
        Duration::from_secs(16),
        4,
        5000,
        4,
    ));
}

#[test]
fn one_stopped_subscriber_slows_no_other_and_drops_no_ingest() {
    check(soak::stalled_subscriber(64, 10_000, Duration::from_secs(4)));
}

#[test]
fn a_collector_outage_loses_no_xid_and_the_agent_stays_in_its_memory_limit() {
    check(soak::collector_outage(Duration::from_secs(10), false));
}
