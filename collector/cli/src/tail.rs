//! `gpulse tail`: live events, reconnecting and resuming after the last one printed.
use std::{
    io::{self, Write},
    time::Duration,
};

use anyhow::bail;
use clap::Args;
use gpulse_proto::{
    names::ShortName,
    render,
    v1::{Event, Lagged, SubscribeRequest, UpstreamState, UpstreamStatus, subscribe_response::Msg},
};
use serde_json::json;

use crate::args::{CollectorArg, FilterArgs};

#[derive(Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    pub collector: CollectorArg,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Replay stored events after this cursor before going live (0 = everything retained).
    #[arg(long)]
    pub after: Option<u64>,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit instead of reconnecting when the stream breaks.
    #[arg(long)]
    pub no_reconnect: bool,
}

/// One event as printed: a JSON object or a line of text.
pub fn event_line(ev: &Event, as_json: bool) -> String {
    if as_json {
        render::event(ev).to_string()
    } else {
        render::line(ev)
    }
}

/// A lag notice in the JSON stream (text output says it on stderr only).
pub fn lagged_line(l: &Lagged) -> String {
    json!({"kind": "lagged", "missed": l.missed, "resume_cursor": l.resume_cursor}).to_string()
}

/// A gateway's note that an upstream's stream ended or came back, as a JSON line.
pub fn upstream_line(u: &UpstreamStatus) -> String {
    json!({"kind": "upstream", "upstream": u.name, "state": UpstreamState::name_of(u.state), "reason": u.reason})
        .to_string()
}

struct Tail {
    args: TailArgs,
    after: Option<u64>,
    /// Through a gateway: its position after the last message (each upstream's cursor).
    resume_token: String,
    seen: u64,
}

impl Tail {
    /// Streams until `--count` is reached (Ok) or the stream breaks (Err).
    async fn stream_once(&mut self) -> anyhow::Result<()> {
        let mut client = self.args.collector.connect().await?;
        let mut stream = client
            .subscribe(SubscribeRequest {
                filter: Some(self.args.filter.to_wire()),
                // A gateway's token says where each upstream stood; a collector's cursor is one.
                after_cursor: self.resume_token.is_empty().then_some(self.after).flatten(),
                resume_token: self.resume_token.clone(),
            })
            .await?
            .into_inner();
        while let Some(msg) = stream.message().await? {
            let mut out = io::stdout().lock();
            if !msg.resume_token.is_empty() {
                self.resume_token = msg.resume_token;
            }
            match msg.msg {
                Some(Msg::Event(ev)) => {
                    self.after = Some(ev.cursor);
                    writeln!(out, "{}", event_line(&ev, self.args.json))?;
                    out.flush()?;
                    self.seen += 1;
                    if self.args.count.is_some_and(|c| self.seen >= c) {
                        return Ok(());
                    }
                }
                Some(Msg::Lagged(l)) => {
                    self.after = Some(self.after.unwrap_or(0).max(l.resume_cursor));
                    eprintln!(
                        "gpulse: fell behind: {} events skipped (resuming after cursor {})",
                        l.missed, l.resume_cursor
                    );
                    if self.args.json {
                        writeln!(out, "{}", lagged_line(&l))?;
                        out.flush()?;
                    }
                }
                Some(Msg::Upstream(u)) => {
                    eprintln!(
                        "gpulse: upstream {} {}{}",
                        u.name,
                        UpstreamState::name_of(u.state),
                        if u.reason.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", u.reason)
                        }
                    );
                    if self.args.json {
                        writeln!(out, "{}", upstream_line(&u))?;
                        out.flush()?;
                    }
                }
                None => {}
            }
        }
        bail!("collector closed the stream")
    }
}

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let after = args.after;
    let mut t = Tail {
        args,
        after,
        resume_token: String::new(),
        seen: 0,
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        let seen = t.seen;
        let e = match t.stream_once().await {
            Ok(()) => return Ok(()),
            Err(e) if t.args.no_reconnect => return Err(e),
            Err(e) => e,
        };
        // An invalid filter will not get better by retrying.
        if let Some(s) = e.downcast_ref::<tonic::Status>()
            && s.code() == tonic::Code::InvalidArgument
        {
            return Err(e);
        }
        if t.seen > seen {
            backoff = Duration::from_millis(200);
        }
        eprintln!("gpulse: {e:#}; reconnecting in {} ms", backoff.as_millis());
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        // Resume after the last event printed; a live-only tail becomes a resuming one so
        // nothing is missed across a collector restart.
        t.after = Some(t.after.unwrap_or(0));
    }
}
