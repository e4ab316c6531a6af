"""Drive gpulse's MCP server with the official Python `mcp` client (2.x).

Usage:
  mcp_client.py --http URL [--token T] --mode auto|legacy|2026-07-28 --node NODE [--bench N]
  mcp_client.py --stdio --mode ... --node NODE -- COMMAND [ARGS...]

Asserts on structured content (the client itself validates it against each tool's outputSchema),
on isError for bad input, and on answers about the events the test fed in. Prints one JSON line
with the negotiated protocol version and, with --bench, tool latencies. Exit status 0 = pass.
"""

import argparse
import asyncio
import json
import sys
import time

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

TOOLS = {
    "collector_status", "list_nodes", "events_summary", "list_events", "xid_summary",
    "describe_xid", "gpu_metric_trend", "describe_node", "list_gpu_processes", "gpu_health",
}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def structured(result, tool):
    check(not result.is_error, f"{tool} failed: {result.content}")
    s = result.structured_content
    check(isinstance(s, dict), f"{tool}: no structured content")
    text = result.content[0].text
    check(json.loads(text) == s, f"{tool}: text block differs from structured content")
    return s


async def timings(client, bench):
    out = {}
    for name, tool, args in [
        ("events_summary_1h", "events_summary", {"since": "1h"}),
        ("gpu_metric_trend_24h", "gpu_metric_trend", {"metric": "gpu_util_pct", "since": "24h", "group_by": "gpu"}),
        ("list_events_50", "list_events", {"since": "1h", "limit": 50}),
    ]:
        times = []
        for _ in range(bench):
            t = time.perf_counter()
            r = await client.call_tool(tool, args)
            times.append((time.perf_counter() - t) * 1000)
            check(not r.is_error, f"{tool} failed in bench: {r.content}")
        times.sort()
        out[name] = {
            "p50": round(times[len(times) // 2], 3),
            "p99": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3),
            "n": len(times),
            "bytes": len(r.content[0].text),
        }
    return out


async def suite(client, node, bench):
    out = {"protocol": str(client.protocol_version)}
    if node == "-":
        # Timings only (the benchmark harness feeds its own data).
        out["latency_ms"] = await timings(client, bench)
        return out
    tools = await client.list_tools()
    names = {t.name for t in tools.tools}
    check(names == TOOLS, f"tools: {sorted(names)}")
    for t in tools.tools:
        check(t.output_schema is not None, f"{t.name} has no outputSchema")
        check(t.annotations.read_only_hint is True, f"{t.name} not read-only")

    s = structured(await client.call_tool("collector_status", {}), "collector_status")
    check(s["nodes_known"] >= 1, "collector_status: no nodes")

    s = structured(await client.call_tool("events_summary", {"since": "1h"}), "events_summary")
    check(s["counts_by_kind"]["xid"] >= 1, f"events_summary: {s['counts_by_kind']}")
    check(any(x["xid"] == 79 for x in s["top_xids"]), f"events_summary top_xids: {s['top_xids']}")
    check(any(i["node"] == node and i["root_cause_xid"] == 79 for i in s["incidents"]),
          f"events_summary incidents: {s['incidents']}")
    check(s["window"]["window_defaulted"] is False, "window echo")

    s = structured(await client.call_tool("list_events", {"nodes": [node], "kinds": ["xid"]}), "list_events")
    check(s["events"] and s["events"][0]["xid"] == 79, f"list_events: {s['events'][:1]}")
    check(s["events"][0]["node"] == node, "list_events node")

    s = structured(await client.call_tool("xid_summary", {"node": node}), "xid_summary")
    check(s["groups"][0]["xid"] == 79 and "RESTART" in s["groups"][0]["recommended_action"], f"xid_summary: {s['groups']}")

    s = structured(await client.call_tool("describe_xid", {"xid": 79}), "describe_xid")
    check(s["name"] == "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS", "describe_xid")

    s = structured(await client.call_tool("describe_node", {"node": node}), "describe_node")
    check(s["xid_count_window"] >= 1 and len(s["gpus"]) >= 1, f"describe_node: {s['xid_count_window']} {len(s['gpus'])}")

    s = structured(await client.call_tool("gpu_metric_trend", {"metric": "gpu_util_pct", "nodes": [node], "group_by": "gpu", "since": "24h"}), "gpu_metric_trend")
    check(s["series"] and s["series"][0]["stats"]["samples"] >= 1, f"gpu_metric_trend: {s['series'][:1]}")

    s = structured(await client.call_tool("list_nodes", {"only_unhealthy": True}), "list_nodes")
    check(any(n["node"] == node and n["health"] == "critical" for n in s["nodes"]), f"list_nodes: {s['nodes']}")

    structured(await client.call_tool("list_gpu_processes", {"node": node}), "list_gpu_processes")

    # The fed XID 79 made the node's GPU unhealthy: the verdict, with what to do.
    s = structured(await client.call_tool("gpu_health", {"node": node}), "gpu_health")
    check(s["unhealthy"] >= 1 and s["gpus"][0]["action"] == "RESTART_BM", f"gpu_health: {s}")
    check(s["gpus"][0]["reasons"][0]["what_to_do"], f"gpu_health what_to_do: {s['gpus'][0]}")

    # Bad input: isError with text that says how to fix it.
    for tool, args, want in [
        ("list_events", {"since": "yesterday"}, "RFC 3339"),
        ("describe_node", {"node": node + "-nope"}, "nearest known"),
        ("describe_xid", {"xid": 999}, "not in the catalog"),
        ("list_events", {"limit": 100000}, "1-500"),
    ]:
        r = await client.call_tool(tool, args)
        check(r.is_error is True, f"{tool} {args}: expected isError")
        check(want in r.content[0].text, f"{tool} {args}: {r.content[0].text}")

    prompts = await client.list_prompts()
    check({p.name for p in prompts.prompts} == {"triage_node", "fleet_health_report"}, "prompts")
    p = await client.get_prompt("triage_node", {"node": node})
    check(node in p.messages[0].content.text, "triage_node prompt")
    res = await client.list_resources()
    check(res.resources[0].uri == "telemetry://xid-catalog", "resources")
    body = await client.read_resource("telemetry://xid-catalog")
    catalog = json.loads(body.contents[0].text)
    check(len(catalog) >= 170, "catalog size")

    if bench:
        out["latency_ms"] = await timings(client, bench)
    return out


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http")
    ap.add_argument("--token")
    ap.add_argument("--stdio", action="store_true")
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--node", required=True)
    ap.add_argument("--bench", type=int, default=0)
    ap.add_argument("command", nargs="*")
    a = ap.parse_args()
    if a.stdio:
        server = StdioServerParameters(command=a.command[0], args=a.command[1:], env={"RUST_LOG": "warn"})
        async with Client(server, mode=a.mode) as c:
            out = await suite(c, a.node, a.bench)
    else:
        headers = {"Authorization": f"Bearer {a.token}"} if a.token else {}
        async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
            async with Client(streamable_http_client(a.http, http_client=http), mode=a.mode) as c:
                out = await suite(c, a.node, a.bench)
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except AssertionError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
