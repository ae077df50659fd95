//! A keyed call's part in deduplication (DESIGN §3.5): claim the key or find
//! it, replay or refuse a retry, keep the first call's answer, and settle
//! the key when the call ends. The table itself is [`crate::dedup`].
//!
//! Replaying an OK answer needs a second hop inside Envoy: a local reply to a
//! gRPC request is always trailers-only, so it cannot carry a message. The
//! retry is marked with [`REPLAY_HEADER`] and given a non-gRPC content type;
//! the route that matches the header sends it to an internal listener that
//! answers a plain 200 once the whole request is in (`envoy/envoy.yaml`).
//! On the way back that answer becomes the kept one: gRPC content type, the
//! kept message, the kept trailers, and `grpc-guard-replayed: true`.

use super::{Call, Effect, Effects, Host, Next, Reply, Side};
use crate::config::{DedupConfig, ScopePart, WhenFull};
use crate::dedup::{
    check_key, digest, is_kept_status, Answer, DedupTable, Digest, Fingerprint, Lookup, Settled, REPLAYED_HEADER,
    REPLAY_CONTENT_TYPE, REPLAY_HEADER, REPLAY_PATH_PREFIX,
};
use crate::metrics::Family;
use crate::record::DedupOutcome;
use crate::status::{GrpcStatus, StatusSource};
use crate::worker::Worker;

/// Where a keyed call stands.
#[derive(Debug)]
pub(super) enum Phase {
    /// This call runs upstream and its answer will be kept.
    First(FirstCall),
    /// The key's first call finished; the whole request is awaited to compare
    /// its fingerprint.
    Verify { fingerprint: Digest, answer: Option<Answer> },
    /// An OK answer is being replayed through the second hop.
    Replay(Answer),
}

/// What the first call of a key collects to keep.
#[derive(Debug)]
pub(super) struct FirstCall {
    slot: u32,
    owner: u64,
    key: Digest,
    request: Fingerprint,
    response: Vec<u8>,
    /// Largest response body kept ([`DedupConfig::max_response_bytes`]).
    limit: usize,
    too_large: bool,
    trailers: Vec<(String, Vec<u8>)>,
}

impl Call {
    fn set_outcome(&mut self, outcome: DedupOutcome, family: Family, fx: &mut Effects) {
        self.dedup_outcome = outcome;
        self.count(family, None, 1, fx);
    }

    /// Request headers of a call to a deduplicated method: check the key,
    /// then claim it, refuse the call, or send it to the replay hop.
    pub(super) fn dedup_request_headers<H: Host>(
        &mut self,
        config: &DedupConfig,
        host: &mut H,
        stream: u32,
        end_of_stream: bool,
        fx: &mut Effects,
    ) -> Next {
        let value = host.request_header(&config.header);
        let key = match check_key(value.as_deref(), config.require_key) {
            Ok(Some(key)) => key,
            Ok(None) => return Next::Continue,
            Err(e) => {
                self.set_outcome(DedupOutcome::BadKey, Family::DedupKeyRejected, fx);
                let message = format!("grpc-guard: idempotency key header {} {e}", config.header);
                return self.answer(GrpcStatus::InvalidArgument, message, fx);
            }
        };
        let key = self.key_digest(config, host, key);
        // Unique among this worker's streams, and across workers by the time.
        let owner = (u64::from(stream) << 40) ^ self.start_ns;
        let in_flight_for = self.deadline.unwrap_or(config.ttl);
        let until = self.start_ns.saturating_add(u64::try_from(in_flight_for.as_nanos()).unwrap_or(u64::MAX));
        match DedupTable::new(config).lookup_or_claim(host, &key, owner, self.start_ns, until) {
            Lookup::Claimed { slot, evicted } => {
                self.set_outcome(DedupOutcome::First, Family::DedupFirst, fx);
                if evicted {
                    self.count(Family::DedupEvicted, None, 1, fx);
                }
                self.dedup = Some(Box::new(Phase::First(FirstCall {
                    slot,
                    owner,
                    key,
                    request: Fingerprint::default(),
                    response: Vec::new(),
                    limit: config.max_response_bytes as usize,
                    too_large: false,
                    trailers: Vec::new(),
                })));
                Next::Continue
            }
            Lookup::InFlight | Lookup::Contended => {
                self.set_outcome(DedupOutcome::InFlight, Family::DedupInFlight, fx);
                self.answer(
                    GrpcStatus::Aborted,
                    "grpc-guard: a call with this idempotency key is in progress; retry",
                    fx,
                )
            }
            Lookup::Done { fingerprint, answer } => {
                self.dedup = Some(Box::new(Phase::Verify { fingerprint, answer }));
                // Only the whole request's fingerprint tells a retry from a
                // reuse of the key, and a paused header callback would hold the
                // body back from this filter too (proxy-wasm turns Pause into
                // StopAllIteration). So the retry goes on now, but to the
                // replay hop, never upstream; its listener answers only once
                // the whole body has passed this filter's check.
                fx.push(Effect::SetRequestHeader("content-type", REPLAY_CONTENT_TYPE.as_bytes().to_vec()));
                fx.push(Effect::SetRequestHeader(REPLAY_HEADER, b"1".to_vec()));
                // Should the replay route be missing (an Istio install without
                // its EnvoyFilter), the retry reaches the service on a path no
                // method has: it is answered Unimplemented, never executed.
                let replay_path = format!("{REPLAY_PATH_PREFIX}{}", self.path);
                fx.push(Effect::SetRequestHeader(":path", replay_path.into_bytes()));
                if end_of_stream {
                    return self.verify_and_replay(&[], fx);
                }
                Next::Continue
            }
            Lookup::Full => {
                self.set_outcome(DedupOutcome::Full, Family::DedupFull, fx);
                match config.when_full {
                    WhenFull::Forward => Next::Continue,
                    WhenFull::Reject => self.answer(
                        GrpcStatus::ResourceExhausted,
                        "grpc-guard: the idempotency table is full; retry later",
                        fx,
                    ),
                }
            }
        }
    }

    /// The key's identity: the scope values, the method and the key itself.
    fn key_digest<H: Host>(&self, config: &DedupConfig, host: &mut H, key: &[u8]) -> Digest {
        let values: Vec<Vec<u8>> = config
            .scope
            .iter()
            .map(|part| match part {
                ScopePart::SourcePrincipal => host.property(&["source", "principal"]),
                ScopePart::Header(name) => host.request_header(name),
            })
            .map(Option::unwrap_or_default)
            .collect();
        let mut parts: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        // A deduplicated method always has a well-formed path: `pkg.Svc/Method`.
        parts.push(self.path.get(1..).unwrap_or_default().as_bytes());
        parts.push(key);
        digest(&parts)
    }

    /// A request body chunk of a keyed call; `None` when the chunk is read
    /// as any other.
    pub(super) fn dedup_request_body<H: Host>(
        &mut self,
        host: &mut H,
        len: usize,
        end_of_stream: bool,
        fx: &mut Effects,
    ) -> Option<Next> {
        match self.dedup.as_deref_mut()? {
            Phase::Verify { .. } => {
                // Envoy buffers the body while this returns Pause; at its end
                // the buffer holds the whole request.
                if !end_of_stream {
                    return Some(Next::Pause);
                }
                let body = host.request_body(0, len).unwrap_or_default();
                let next = self.verify_and_replay(&body, fx);
                let _ = self.read_frames(
                    Side::Request,
                    len,
                    |offset, n| body.get(offset..offset + n).map(<[u8]>::to_vec),
                    fx,
                );
                Some(next)
            }
            Phase::First(first) => {
                if let Some(chunk) = host.request_body(0, len) {
                    first.request.update(&chunk);
                }
                None
            }
            Phase::Replay(_) => None,
        }
    }

    /// A retry of a finished key, with its whole request: replay the kept
    /// answer if the request is the same, refuse it otherwise.
    fn verify_and_replay(&mut self, body: &[u8], fx: &mut Effects) -> Next {
        let Some(Phase::Verify { fingerprint, answer }) = self.dedup.take().map(|p| *p) else { return Next::Continue };
        if Fingerprint::of(body) != fingerprint {
            self.set_outcome(DedupOutcome::Mismatch, Family::DedupMismatch, fx);
            return self.answer(
                GrpcStatus::InvalidArgument,
                "grpc-guard: idempotency key reused with a different request",
                fx,
            );
        }
        let Some(answer) = answer else {
            self.set_outcome(DedupOutcome::NotKept, Family::DedupNotKept, fx);
            return self.answer(
                GrpcStatus::AlreadyExists,
                "grpc-guard: this call already ran; its answer was too large to keep for replay",
                fx,
            );
        };
        self.dedup_outcome = DedupOutcome::Replay;
        self.answered_by_guard = true;
        if answer.status != GrpcStatus::Ok {
            // An error has no message: a trailers-only local reply carries it whole.
            self.count(Family::DedupReplayed, None, 1, fx);
            let mut headers = vec![
                ("grpc-status".to_owned(), answer.status.code().to_string()),
                (REPLAYED_HEADER.to_owned(), "true".to_owned()),
            ];
            if let Some((_, message)) = answer.trailers.iter().find(|(n, _)| n == "grpc-message") {
                headers.push(("grpc-message".to_owned(), String::from_utf8_lossy(message).into_owned()));
            }
            fx.push(Effect::Reply(Reply::Headers(headers)));
            return Next::Pause;
        }
        // An OK answer carries a message: the retry, already on its way to the
        // replay hop, is let through; its answer is rewritten on the way back.
        self.dedup = Some(Box::new(Phase::Replay(answer)));
        Next::Continue
    }

    /// Response headers of a retry sent to the replay hop: true when they
    /// were the hop's answer and now are the kept answer's.
    pub(super) fn replay_response_headers<H: Host>(&mut self, host: &mut H, fx: &mut Effects) -> bool {
        if !matches!(self.dedup.as_deref(), Some(Phase::Replay(_))) {
            return false;
        }
        let hop_answered =
            host.response_header(":status").as_deref() == Some(b"200") && host.response_header("grpc-status").is_none();
        if !hop_answered {
            // The replay hop failed (no route, no listener): its answer goes
            // to the client as it is, unmarked.
            self.dedup = None;
            self.dedup_outcome = DedupOutcome::ReplayFailed;
            return false;
        }
        self.count(Family::DedupReplayed, None, 1, fx);
        // The internal listener's plain 200 becomes the kept gRPC answer;
        // its body and trailers follow in the body step.
        fx.push(Effect::SetResponseHeader("content-type", b"application/grpc".to_vec()));
        fx.push(Effect::RemoveResponseHeader("content-length"));
        fx.push(Effect::SetResponseHeader(REPLAYED_HEADER, b"true".to_vec()));
        self.seen.http_status = Some(200);
        true
    }

    /// A response body chunk of a keyed call; `None` when the chunk is read
    /// as any other.
    pub(super) fn dedup_response_body<H: Host>(
        &mut self,
        host: &mut H,
        len: usize,
        end_of_stream: bool,
        fx: &mut Effects,
    ) -> Option<Next> {
        match self.dedup.as_deref_mut()? {
            Phase::Replay(_) => {
                // Hold the placeholder until the end, then put the kept
                // message and trailers in its place (trailers can be added
                // only here, at end of stream).
                if !end_of_stream {
                    return Some(Next::Pause);
                }
                let Some(Phase::Replay(answer)) = self.dedup.take().map(|p| *p) else { return None };
                self.seen.trailer_status = Some(answer.status);
                self.seen.complete = true;
                self.note_answer(host);
                let body = &answer.body;
                let _ = self.read_frames(
                    Side::Response,
                    body.len(),
                    |offset, n| body.get(offset..offset + n).map(<[u8]>::to_vec),
                    fx,
                );
                fx.push(Effect::ReplaceResponseBody(answer.body));
                for (name, value) in answer.trailers {
                    fx.push(Effect::AddResponseTrailer(name, value));
                }
                self.tag_seen_status(fx);
                Some(Next::Continue)
            }
            Phase::First(first) if !first.too_large => {
                if first.response.len() + len > first.limit {
                    first.too_large = true;
                    first.response = Vec::new();
                } else if let Some(chunk) = host.response_body(0, len) {
                    first.response.extend_from_slice(&chunk);
                }
                None
            }
            _ => None,
        }
    }

    /// A trailers-only answer of a first call: its `grpc-status` and
    /// `grpc-message` headers are kept in place of trailers.
    pub(super) fn keep_status_headers<H: Host>(&mut self, host: &mut H) {
        if let Some(Phase::First(first)) = self.dedup.as_deref_mut() {
            first.trailers = ["grpc-status", "grpc-message"]
                .iter()
                .filter_map(|name| host.response_header(name).map(|v| ((*name).to_owned(), v)))
                .collect();
        }
    }

    /// The trailers of a first call, kept whole.
    pub(super) fn keep_trailers<H: Host>(&mut self, host: &mut H) {
        if let Some(Phase::First(first)) = self.dedup.as_deref_mut() {
            first.trailers = host.response_trailers();
        }
    }

    /// Settles the first call of a key: keep what a retry would get again,
    /// free the key otherwise.
    pub(super) fn dedup_settle<H: Host>(
        &mut self,
        worker: &Worker,
        host: &mut H,
        status: GrpcStatus,
        source: StatusSource,
    ) {
        let Some(config) = worker.config.dedup.as_ref() else { return };
        let Some(Phase::First(first)) = self.dedup.take().map(|p| *p) else { return };
        let answered = matches!(source, StatusSource::Trailers | StatusSource::Headers);
        let result = (answered && is_kept_status(status)).then(|| Settled {
            fingerprint: first.request.finish(),
            answer: (!first.too_large).then_some(Answer { status, body: first.response, trailers: first.trailers }),
        });
        if matches!(result, Some(Settled { answer: None, .. })) {
            self.dedup_outcome = DedupOutcome::NotKept;
        }
        let now = host.now_ns();
        DedupTable::new(config).settle(host, first.slot, &first.key, first.owner, result, now);
    }
}
