//! `gpulse events`: stored events of a window, filtered and paged.
use std::io::{self, Write};

use clap::Args;
use gpulse_proto::{
    render,
    v1::{Event, ListEventsRequest, ListEventsResponse, Order, TimeWindow},
};
use serde_json::json;

use crate::{
    args::{CollectorArg, FilterArgs},
    window_line,
};

#[derive(Args, Debug)]
pub struct EventsArgs {
    #[command(flatten)]
    pub collector: CollectorArg,
    /// Window start: a duration back from now (90s, 15m, 1h, 7d), now-<duration>, or RFC 3339.
    #[arg(long, default_value = "1h", value_parser = crate::args::since)]
    pub since: String,
    /// Window end: now, now-<duration> or RFC 3339.
    #[arg(long, default_value = "now", value_parser = crate::args::until)]
    pub until: String,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Events per page (1-1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Follow pages to the end of the window (at most --max-events events).
    #[arg(long)]
    pub all: bool,
    #[arg(long, default_value_t = 100_000)]
    pub max_events: u64,
    /// Continue from a previous page's next_page_token.
    #[arg(long)]
    pub page_token: Option<String>,
    /// Oldest first instead of newest first.
    #[arg(long)]
    pub oldest_first: bool,
    /// One JSON document: window, coverage, total_matched, events, next_page_token, hints,
    /// and through a gateway upstreams and partial.
    #[arg(long)]
    pub json: bool,
}

/// The pages read: the first page's answer (with every page's hints) and all events.
pub struct Pages {
    pub head: ListEventsResponse,
    pub events: Vec<Event>,
    /// Where a next call would continue; empty at the end of the window.
    pub next_page_token: String,
}

pub fn render_json(p: &Pages) -> String {
    let mut hints = p.head.hints.clone();
    hints.dedup();
    json!({
        "window": p.head.window.as_ref().map(render::window),
        "total_matched": p.head.total_matched,
        "returned": p.events.len(),
        "events": p.events.iter().map(render::event).collect::<Vec<_>>(),
        "next_page_token": (!p.next_page_token.is_empty()).then_some(&p.next_page_token),
        "expired_while_paging": p.head.expired_while_paging,
        "hints": hints,
        "upstreams": render::upstreams(&p.head.upstreams),
        "partial": p.head.partial,
    })
    .to_string()
}

pub fn render_text(p: &Pages) -> String {
    let mut s = format!(
        "{}: {} matching, showing {}\n",
        window_line(p.head.window.as_ref()),
        p.head.total_matched,
        p.events.len()
    );
    for ev in &p.events {
        s.push_str(&render::line(ev));
        s.push('\n');
    }
    if !p.next_page_token.is_empty() {
        s.push_str(&format!(
            "more: --page-token {}  (or --all)\n",
            p.next_page_token
        ));
    }
    s
}

impl Pages {
    fn first(mut head: ListEventsResponse) -> Self {
        Self {
            events: std::mem::take(&mut head.events),
            next_page_token: std::mem::take(&mut head.next_page_token),
            head,
        }
    }

    fn add(&mut self, r: ListEventsResponse) {
        self.head.hints.extend(r.hints);
        // Through a gateway: partial if any page was, each upstream as it did on its worst page.
        self.head.partial |= r.partial;
        for u in r.upstreams {
            match self.head.upstreams.iter_mut().find(|h| h.name == u.name) {
                Some(h) if h.state == gpulse_proto::v1::UpstreamState::Ok as i32 => *h = u,
                Some(_) => {}
                None => self.head.upstreams.push(u),
            }
        }
        self.head.expired_while_paging = r.expired_while_paging;
        self.events.extend(r.events);
        self.next_page_token = r.next_page_token;
    }
}

async fn read_pages(a: &EventsArgs) -> anyhow::Result<Pages> {
    let mut client = a.collector.connect().await?;
    let mut req = ListEventsRequest {
        window: Some(TimeWindow {
            since: a.since.clone(),
            until: a.until.clone(),
        }),
        filter: Some(a.filter.to_wire()),
        limit: a.limit,
        page_token: a.page_token.clone().unwrap_or_default(),
        order: if a.oldest_first {
            Order::OldestFirst
        } else {
            Order::NewestFirst
        } as i32,
        resume_after: Default::default(),
    };
    let mut p = Pages::first(client.list_events(req.clone()).await?.into_inner());
    while a.all && !p.next_page_token.is_empty() && (p.events.len() as u64) < a.max_events {
        req.page_token.clone_from(&p.next_page_token);
        p.add(client.list_events(req.clone()).await?.into_inner());
    }
    Ok(p)
}

pub async fn run(a: EventsArgs) -> anyhow::Result<()> {
    let p = read_pages(&a).await?;
    let mut out = io::stdout().lock();
    if a.json {
        writeln!(out, "{}", render_json(&p))?;
        return Ok(());
    }
    write!(out, "{}", render_text(&p))?;
    if p.head.partial {
        eprintln!("gpulse: {}", render::partial_note(&p.head.upstreams));
    }
    for h in &p.head.hints {
        eprintln!("gpulse: note: {h}");
    }
    Ok(())
}
