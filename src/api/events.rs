//! `GET /events`: Server-Sent Events of task and TI changes, filtered by
//! `model_name` and `task_id`. Each event carries its id; a client that reconnects with
//! `Last-Event-ID` gets what it missed while that is still in the service's ring of
//! `server.event_buffer` events (10 000 by default), else first an `event: reset`. A client that falls so far
//! behind that its next event has left the ring is disconnected, and resumes the same
//! way. A comment keeps the connection alive every 15 s.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use futures::Stream;
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;

use super::error::{ApiError, ApiQuery};
use super::AppState;
use crate::scheduling::{Event, Scheduler, Since};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/events", get(events))
}

/// Which events.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub(super) struct EventsQuery {
    /// Only this model's task and TI events.
    #[serde(default)]
    pub model_name: Option<String>,
    /// Only this task's events.
    #[serde(default)]
    pub task_id: Option<String>,
}

impl EventsQuery {
    fn wants(&self, event: &Event) -> bool {
        self.model_name
            .as_deref()
            .is_none_or(|m| m == event.model_name())
            && self
                .task_id
                .as_deref()
                .is_none_or(|t| event.task_id().is_some_and(|id| id.as_str() == t))
    }
}

/// How often a comment keeps an idle stream alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Task and TI events as Server-Sent Events.
#[utoipa::path(get, path = "/events",
    params(("model_name" = Option<String>, Query, description = "only this model"),
           ("task_id" = Option<String>, Query, description = "only this task"),
           ("Last-Event-ID" = Option<String>, Header, nullable = false, pattern = "^[0-9]{1,19}$", description = "resume after this event (its id)")),
    responses((status = 200, content_type = "text/event-stream",
               description = "`event: task` / `event: ti` with JSON data, `event: reset` when events were missed"),
              (status = 400, description = "bad filter or Last-Event-ID")))]
pub(super) async fn events(
    State(app): State<AppState>,
    headers: HeaderMap,
    query: Result<ApiQuery<EventsQuery>, ApiError>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let ApiQuery(filter) = query?;
    let resume = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest("Last-Event-ID must be an event id (a number)".into())
                })
        })
        .transpose()?;
    let scheduler = app.scheduler.clone();
    let cursor = resume.unwrap_or_else(|| scheduler.events().last_id());
    let state = Reader {
        scheduler,
        filter,
        cursor,
        resumed: resume.is_some(),
        started: false,
        pending: VecDeque::new(),
    };
    let stream = futures::stream::unfold(state, |mut r| async move {
        let event = r.next().await?;
        Some((Ok(event), r))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// One client's position in the event ring.
struct Reader {
    scheduler: Scheduler,
    filter: EventsQuery,
    /// Id of the last event it was sent (or skipped).
    cursor: u64,
    /// It gave a `Last-Event-ID`.
    resumed: bool,
    /// It has read once: from now on, falling out of the ring ends the stream.
    started: bool,
    /// Events read from the ring and not yet sent.
    pending: VecDeque<SseEvent>,
}

impl Reader {
    /// The next event to send; `None` ends the stream.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let events = self.scheduler.events();
            match events.since(self.cursor) {
                Since::Gone(last) if !self.started && self.resumed => {
                    let data = json!({
                        "message": format!(
                            "events after {} are no longer kept (only the last {} are); \
                             this stream goes on after id {last}",
                            self.cursor,
                            events.capacity()
                        ),
                    });
                    self.started = true;
                    self.cursor = last;
                    return Some(
                        SseEvent::default()
                            .event("reset")
                            .id(last.to_string())
                            .data(data.to_string()),
                    );
                }
                // Too slow: the events it has not read are gone. It resumes with its
                // Last-Event-ID and gets a reset.
                Since::Gone(_) => return None,
                Since::Events(list) if !list.is_empty() => {
                    self.started = true;
                    for (id, event) in list {
                        self.cursor = id;
                        if self.filter.wants(&event) {
                            self.pending.push_back(sse_event(id, &event));
                        }
                    }
                }
                Since::Events(_) => {
                    self.started = true;
                    tokio::select! {
                        _ = events.wait_after(self.cursor) => {}
                        _ = self.scheduler.serving_stops() => return None,
                    }
                }
            }
        }
    }
}

fn sse_event(id: u64, event: &Event) -> SseEvent {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    SseEvent::default()
        .event(event.name())
        .id(id.to_string())
        .data(data)
}
