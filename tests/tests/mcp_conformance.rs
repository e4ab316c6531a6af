//! The official MCP conformance suite (npm `@modelcontextprotocol/conformance` 0.1.16 on Node 22,
//! both installed by the test under target/npm) against a real collector's `/mcp`, and a
//! gateway's `/mcp` over it (the same MCP crate over the merged API). Every server
//! scenario the suite lists runs, except those that exercise the suite's own reference server
//! (its fixture tools, prompts and resources, which no real server has); the scenarios gpulse
//! leaves out on purpose are in `tests/mcp/conformance-expected-failures.yaml`, each with its
//! reason. A scenario that fails and is not listed there, or one listed that now passes, fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]
use std::{path::Path, process::Command};

use gpulse_e2e::{Collector, Gateway, free_port, npm_packages};

const PACKAGES: [&str; 2] = ["@modelcontextprotocol/conformance@0.1.16", "node@22"];

/// Scenarios that call the reference test server's fixtures (tools such as `test_image_content`,
/// prompts such as `test_prompt_with_arguments`, resources under `test://`): they say nothing
/// about a server with its own tools.
const FIXTURE_SCENARIOS: [&str; 20] = [
    "tools-call-simple-text",
    "tools-call-image",
    "tools-call-audio",
    "tools-call-embedded-resource",
    "tools-call-mixed-content",
    "tools-call-with-logging",
    "tools-call-error",
    "tools-call-with-progress",
    "tools-call-sampling",
    "tools-call-elicitation",
    "json-schema-2020-12",
    "elicitation-sep1034-defaults",
    "elicitation-sep1330-enums",
    "resources-read-text",
    "resources-read-binary",
    "resources-templates-read",
    "prompts-get-simple",
    "prompts-get-with-args",
    "prompts-get-embedded-resource",
    "prompts-get-with-image",
];

/// One scenario's outcome as the suite printed it.
struct Outcome {
    scenario: String,
    summary: String,
    ok: bool,
    output: String,
}

fn conformance(prefix: &Path) -> Command {
    let bin = prefix.join("node_modules/.bin");
    let mut c = Command::new(bin.join("node"));
    c.arg(bin.join("conformance"));
    c
}

#[test]
fn the_official_conformance_suite_passes() {
    let prefix =
        npm_packages("mcp-conformance", &PACKAGES).expect("npm install (Debian package npm)");
    let list = conformance(&prefix)
        .args(["list", "--server"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    let scenarios: Vec<String> = listed
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(
        scenarios.len() >= 30,
        "the suite lists its scenarios: {listed}"
    );
    for f in FIXTURE_SCENARIOS {
        assert!(
            scenarios.iter().any(|s| s == f),
            "{f} is no longer a scenario: update the list"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (g, h) = (free_port(), free_port());
    let c = Collector::start(&dir.path().join("data"), g, h, &["--fsync", "never"]).unwrap();
    let gw = Gateway::start(dir.path(), &[("c1", c.url())], &[]).unwrap();
    let expected =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/conformance-expected-failures.yaml");
    let urls = [
        ("collector", format!("http://127.0.0.1:{h}/mcp")),
        ("gateway", format!("http://127.0.0.1:{}/mcp", gw.http_port)),
    ];
    let mut outcomes = Vec::new();
    for (server, url) in &urls {
        for s in scenarios
            .iter()
            .filter(|s| !FIXTURE_SCENARIOS.contains(&s.as_str()))
        {
            let out = conformance(&prefix)
                .args([
                    "server",
                    "--url",
                    url,
                    "--scenario",
                    s,
                    "--expected-failures",
                ])
                .arg(&expected)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let summary = text
                .lines()
                .find(|l| l.starts_with("Passed:"))
                .unwrap_or("no summary")
                .to_string();
            outcomes.push(Outcome {
                scenario: format!("{server}: {s}"),
                summary,
                ok: out.status.success(),
                output: text,
            });
        }
    }
    println!("MCP conformance 0.1.16 against gpulse-collector /mcp and a gateway's /mcp:");
    for o in &outcomes {
        println!(
            "  {:<44} {}{}",
            o.scenario,
            o.summary,
            if o.ok { "" } else { "  << UNEXPECTED" }
        );
    }
    let bad: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    assert!(
        bad.is_empty(),
        "{}",
        bad.iter()
            .map(|o| format!("== {}\n{}", o.scenario, o.output))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
