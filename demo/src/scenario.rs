//! The client's traffic scenarios: which calls to make and which status each
//! one must come back with.
//!
//! A scenario is a plain list of [`PlannedCall`]s, so what `make run` sends
//! and what it expects can be read and tested without a server; [`run`] is
//! the only part that touches the network.

use std::fmt;
use std::time::{Duration, Instant};

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::pb::{CollectRequest, CountRequest, EchoReply, EchoRequest};

/// A method path the demo service does not implement; the server must answer
/// it with `Unimplemented`.
pub const MISSING_METHOD: &str = "/grpcguard.demo.v1.Demo/Missing";

/// The Echo failures of the `mix` scenario: the codes a guard is most often
/// asked to count, retry or hide.
const MIX_FAILURES: [Code; 6] = [
    Code::NotFound,
    Code::InvalidArgument,
    Code::PermissionDenied,
    Code::Unavailable,
    Code::Internal,
    Code::ResourceExhausted,
];

/// Long enough to stand out in latency metrics, short enough for `make run`.
const SLOW_CALL_DELAY_MS: u32 = 300;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// OK and failing unary calls, a slow call, both streaming kinds and an
    /// unimplemented method.
    Mix,
    /// Calls to an upstream that is down: every one must be Unavailable. The
    /// calls carry [`DOWN_ROUTE_HEADER`], which the shipped Envoy config routes
    /// to a port where nothing listens; a target that is itself down answers
    /// the same.
    Down,
}

/// Request header that `envoy/envoy.yaml` routes to its "upstream down" cluster.
pub const DOWN_ROUTE_HEADER: (&str, &str) = ("x-grpc-guard-demo", "upstream-down");

/// One call a scenario makes.
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    Echo(EchoRequest),
    /// Echo carrying [`DOWN_ROUTE_HEADER`].
    EchoToDownUpstream(EchoRequest),
    Count(CountRequest),
    /// Client streaming: one `CollectRequest` per value.
    Collect(Vec<u32>),
    /// A unary call to [`MISSING_METHOD`].
    Missing,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlannedCall {
    pub call: Call,
    pub expected: Code,
}

impl Scenario {
    pub fn calls(self) -> Vec<PlannedCall> {
        match self {
            Scenario::Mix => mix(),
            Scenario::Down => (1..=3)
                .map(|i| PlannedCall {
                    call: Call::EchoToDownUpstream(EchoRequest {
                        message: format!("hello {i}"),
                        ..EchoRequest::default()
                    }),
                    expected: Code::Unavailable,
                })
                .collect(),
        }
    }
}

fn mix() -> Vec<PlannedCall> {
    let ok_echoes = (1..=3).map(|i| EchoRequest { message: format!("hello {i}"), ..EchoRequest::default() });
    let failing_echoes = MIX_FAILURES.iter().map(|&code| EchoRequest {
        message: "please fail".to_owned(),
        fail_code: code as i32,
        ..EchoRequest::default()
    });
    let slow_echo = EchoRequest { message: "slow".to_owned(), delay_ms: SLOW_CALL_DELAY_MS, ..EchoRequest::default() };
    let mut calls: Vec<PlannedCall> = ok_echoes
        .chain(failing_echoes)
        .chain(std::iter::once(slow_echo))
        .map(|request| PlannedCall { expected: Code::from(request.fail_code), call: Call::Echo(request) })
        .collect();
    calls.push(PlannedCall {
        call: Call::Count(CountRequest { count: 5, interval_ms: 10, fail_code: 0 }),
        expected: Code::Ok,
    });
    calls.push(PlannedCall { call: Call::Collect(vec![1, 2, 3, 4]), expected: Code::Ok });
    calls.push(PlannedCall { call: Call::Missing, expected: Code::Unimplemented });
    calls
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::Echo(request) => {
                write!(f, "Echo  fail_code={}", request.fail_code)?;
                if request.delay_ms > 0 {
                    write!(f, " delay_ms={}", request.delay_ms)?;
                }
                if request.reply_padding > 0 {
                    write!(f, " reply_padding={}", request.reply_padding)?;
                }
                Ok(())
            }
            Call::EchoToDownUpstream(_) => write!(f, "Echo  to an upstream that is down"),
            Call::Count(request) => write!(f, "Count  count={} fail_code={}", request.count, request.fail_code),
            Call::Collect(values) => write!(f, "Collect  values={}", values.len()),
            Call::Missing => write!(f, "Missing  {MISSING_METHOD}"),
        }
    }
}

/// What one call got back, printed as one line.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub planned: PlannedCall,
    pub code: Code,
    /// The reply in brief, or the status message.
    pub detail: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn is_expected(&self) -> bool {
        self.code == self.planned.expected
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}  -> {:?}", self.planned.call, self.code)?;
        if !self.detail.is_empty() {
            write!(f, " {}", self.detail)?;
        }
        write!(f, "  ({} ms)", self.elapsed.as_millis())?;
        if !self.is_expected() {
            write!(f, "  EXPECTED {:?}", self.planned.expected)?;
        }
        Ok(())
    }
}

/// Makes one call on `channel`, with `timeout` as its gRPC deadline if given.
pub async fn run(channel: &Channel, planned: PlannedCall, timeout: Option<Duration>) -> Outcome {
    let started = Instant::now();
    let (code, detail) = match &planned.call {
        Call::Echo(request) => echo(channel, with_deadline(request.clone(), timeout)).await,
        Call::EchoToDownUpstream(request) => {
            let mut request = with_deadline(request.clone(), timeout);
            let (name, value) = DOWN_ROUTE_HEADER;
            request.metadata_mut().insert(name, tonic::metadata::MetadataValue::from_static(value));
            echo(channel, request).await
        }
        Call::Count(request) => count(channel, *request, timeout).await,
        Call::Collect(values) => collect(channel, values.clone(), timeout).await,
        Call::Missing => missing(channel, timeout).await,
    };
    Outcome { planned, code, detail, elapsed: started.elapsed() }
}

fn with_deadline<T>(message: T, timeout: Option<Duration>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

fn failed(status: &Status) -> (Code, String) {
    let detail = if status.message().is_empty() { String::new() } else { format!("{:?}", status.message()) };
    (status.code(), detail)
}

async fn echo(channel: &Channel, request: Request<EchoRequest>) -> (Code, String) {
    let mut client = crate::client(channel.clone());
    match client.echo(request).await {
        Ok(reply) => {
            let reply = reply.into_inner();
            (Code::Ok, format!("{:?} execution={}", reply.message, reply.execution))
        }
        Err(status) => failed(&status),
    }
}

async fn count(channel: &Channel, request: CountRequest, timeout: Option<Duration>) -> (Code, String) {
    let mut client = crate::client(channel.clone());
    let mut stream = match client.count(with_deadline(request, timeout)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return failed(&status),
    };
    let mut received = 0u32;
    loop {
        match stream.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => return (Code::Ok, format!("{received} messages")),
            Err(status) => {
                let (code, message) = failed(&status);
                return (code, format!("{message} after {received} messages"));
            }
        }
    }
}

async fn collect(channel: &Channel, values: Vec<u32>, timeout: Option<Duration>) -> (Code, String) {
    let mut client = crate::client(channel.clone());
    let requests = tokio_stream::iter(values.into_iter().map(|value| CollectRequest { value }));
    match client.collect(with_deadline(requests, timeout)).await {
        Ok(reply) => {
            let reply = reply.into_inner();
            (Code::Ok, format!("sum={} count={}", reply.sum, reply.count))
        }
        Err(status) => failed(&status),
    }
}

/// The generated client only knows the methods in the proto, so a call to a
/// path the server lacks goes through tonic's generic `Grpc` client.
async fn missing(channel: &Channel, timeout: Option<Duration>) -> (Code, String) {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    if let Err(error) = grpc.ready().await {
        return failed(&Status::unavailable(format!("channel not ready: {error}")));
    }
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let request = with_deadline(EchoRequest::default(), timeout);
    match grpc.unary(request, PathAndQuery::from_static(MISSING_METHOD), codec).await {
        Ok(_) => (Code::Ok, "answered a method it does not have".to_owned()),
        Err(status) => failed(&status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_expects_each_echo_failure_to_come_back_with_its_own_code() {
        let expected: Vec<Code> = Scenario::Mix
            .calls()
            .into_iter()
            .filter_map(|planned| match planned.call {
                Call::Echo(request) if request.fail_code != 0 => {
                    assert_eq!(planned.expected, Code::from(request.fail_code));
                    Some(planned.expected)
                }
                _ => None,
            })
            .collect();
        assert_eq!(expected, MIX_FAILURES);
    }

    #[test]
    fn mix_covers_a_slow_call_both_streams_and_an_unimplemented_method() {
        let calls = Scenario::Mix.calls();
        assert!(calls.iter().any(|p| matches!(&p.call, Call::Echo(r) if r.delay_ms > 0 && p.expected == Code::Ok)));
        assert!(calls.iter().any(|p| matches!(p.call, Call::Count(r) if r.count == 5)));
        assert!(calls.iter().any(|p| matches!(p.call, Call::Collect(_))));
        assert!(calls.iter().any(|p| p.call == Call::Missing && p.expected == Code::Unimplemented));
    }

    #[test]
    fn down_expects_every_call_to_be_unavailable() {
        let calls = Scenario::Down.calls();
        assert!(!calls.is_empty());
        assert!(calls.iter().all(|p| p.expected == Code::Unavailable));
    }

    #[test]
    fn outcome_line_names_call_code_message_and_time() {
        let outcome = Outcome {
            planned: PlannedCall {
                call: Call::Echo(EchoRequest { fail_code: 5, ..EchoRequest::default() }),
                expected: Code::NotFound,
            },
            code: Code::NotFound,
            detail: "\"demo failure: NotFound\"".to_owned(),
            elapsed: Duration::from_millis(3),
        };
        assert_eq!(outcome.to_string(), "Echo  fail_code=5  -> NotFound \"demo failure: NotFound\"  (3 ms)");
    }

    #[test]
    fn outcome_line_names_the_expected_code_when_it_differs() {
        let outcome = Outcome {
            planned: PlannedCall { call: Call::Missing, expected: Code::Unimplemented },
            code: Code::Unavailable,
            detail: "\"no healthy upstream\"".to_owned(),
            elapsed: Duration::from_millis(1),
        };
        assert!(!outcome.is_expected());
        assert!(outcome.to_string().ends_with("EXPECTED Unimplemented"));
    }
}
