//! The chaos controller's plan: for every call, its deadline and what the controller does with
//! its request, drawn from one seed; and, for each behaviour, the outcome the README documents.

use std::time::Duration;

use tonic::Code;

use taskgate::fault::{self, FAULTS};

use super::{DEADLINES, MAX_RESPONSE_BYTES, Outcome, SUCCESS};

/// Every call's deadline and what the controller does with it, drawn from one seed.
pub(super) struct Plan {
    pub(super) calls: Vec<Planned>,
}

#[derive(Debug)]
pub(super) struct Planned {
    pub(super) deadline: Option<Duration>,
    pub(super) behaviour: Behaviour,
}

/// What the chaos controller does with one request.
#[derive(Debug, Clone)]
pub(super) enum Behaviour {
    /// A whole reply, possibly slow or odd in its framing.
    Reply(Reply),
    /// Close the connection (FIN) once the request has arrived, before any reply.
    CloseBeforeHead,
    /// Reset the connection (RST) once the request has arrived, before any reply.
    ResetBeforeHead,
    /// A 200 head and half its body, then a reset.
    ResetAfterHead,
    /// A 200 head announcing more body than comes, then a close: the reply is cut short.
    Truncate { framing: Framing },
    /// Bytes that are not an HTTP response at all, then a close.
    NotHttp { seed: u64 },
    /// A head with two different Content-Length values.
    TwoContentLengths,
    /// Never answer; wait for the gateway to give up and close.
    Hang,
}

/// A whole reply.
#[derive(Debug, Clone)]
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) body: Body,
    pub(super) framing: Framing,
    pub(super) pacing: Pacing,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Body {
    Success,
    Fault(u32),
    /// Bytes that are not a task-interface response, drawn from this seed.
    Garbage(u64),
    /// A success reply padded past `--max-response-bytes`.
    Oversized,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Framing {
    ContentLength,
    Chunked,
    /// Both `Transfer-Encoding: chunked` and a `Content-Length`; RFC 9112 §6.1 says to read it
    /// as chunked.
    Conflicting,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Pacing {
    AtOnce,
    /// Wait, then send the reply.
    Delay(Duration),
    /// Send the head a few bytes at a time, this long apart.
    SlowHead(Duration),
    /// Send the body a few bytes at a time, this long apart.
    Drip(Duration),
    /// Send this many 1xx interim replies first.
    Informational(usize),
}

/// Bytes per piece of a slow head or a drip-fed body.
pub(super) const PIECE: usize = 16;

impl Plan {
    pub(super) fn draw(seed: u64, calls: usize) -> Plan {
        let mut random = SplitMix64(seed);
        let calls = (0..calls)
            .map(|_| Planned {
                deadline: DEADLINES[random.below(DEADLINES.len())],
                behaviour: Behaviour::draw(&mut random),
            })
            .collect();
        Plan { calls }
    }
}

impl Behaviour {
    fn draw(random: &mut SplitMix64) -> Behaviour {
        let framing = [Framing::ContentLength, Framing::Chunked][random.below(2)];
        let reply = |body, pacing| {
            Behaviour::Reply(Reply {
                status: 200,
                body,
                framing,
                pacing,
            })
        };
        let millis =
            |random: &mut SplitMix64, most: u64| Duration::from_millis(random.next() % (most + 1));
        match random.below(16) {
            0 | 1 => reply(Body::Success, Pacing::AtOnce),
            // Every fault the table lists, an unlisted 1xxx code and one outside the range.
            2..=4 => {
                let code = match random.below(FAULTS.len() + 2) {
                    index if index < FAULTS.len() => FAULTS[index].code,
                    index if index == FAULTS.len() => 1005,
                    _ => 2_000 + (random.next() % 100_000) as u32,
                };
                // A fault is the controller's answer whatever HTTP status carries it.
                let status = [200, 400, 500][random.below(3)];
                Behaviour::Reply(Reply {
                    status,
                    body: Body::Fault(code),
                    framing,
                    pacing: Pacing::AtOnce,
                })
            }
            5 => {
                let status = [400, 404, 429, 500, 502, 503][random.below(6)];
                let body =
                    [Body::Success, Body::Garbage(random.next()), Body::Oversized][random.below(3)];
                Behaviour::Reply(Reply {
                    status,
                    body,
                    framing,
                    pacing: Pacing::AtOnce,
                })
            }
            6 => reply(Body::Success, Pacing::Delay(millis(random, 1_500))),
            7 => reply(Body::Success, Pacing::SlowHead(millis(random, 40))),
            8 => reply(Body::Success, Pacing::Drip(millis(random, 200))),
            9 => reply(Body::Success, Pacing::Informational(1 + random.below(500))),
            10 => Behaviour::Reply(Reply {
                status: 200,
                body: Body::Success,
                framing: Framing::Conflicting,
                pacing: Pacing::AtOnce,
            }),
            11 => reply(Body::Garbage(random.next()), Pacing::AtOnce),
            12 => reply(Body::Oversized, Pacing::AtOnce),
            13 => [
                Behaviour::CloseBeforeHead,
                Behaviour::ResetBeforeHead,
                Behaviour::ResetAfterHead,
                Behaviour::Truncate { framing },
            ][random.below(4)]
            .clone(),
            14 => [
                Behaviour::NotHttp {
                    seed: random.next(),
                },
                Behaviour::TwoContentLengths,
            ][random.below(2)]
            .clone(),
            _ => Behaviour::Hang,
        }
    }

    /// A name for the outcome table: the behaviour without its parameters.
    pub(super) fn name(&self) -> String {
        match self {
            Behaviour::Reply(reply) => {
                let body = match reply.body {
                    Body::Success => "success".to_owned(),
                    Body::Fault(code) => match fault::classify(code) {
                        fault::FaultClass::Known(_) => format!("fault {code}"),
                        fault::FaultClass::Unknown(_) => "fault, unlisted 1xxx".to_owned(),
                        fault::FaultClass::OutOfRange(_) => "fault, out of range".to_owned(),
                    },
                    Body::Garbage(_) => "garbage body".to_owned(),
                    Body::Oversized => "oversized body".to_owned(),
                };
                let status = match reply.status {
                    200 => String::new(),
                    status => format!(" under HTTP {status}"),
                };
                let odd = match (reply.framing, reply.pacing) {
                    (Framing::Conflicting, _) => ", conflicting framing",
                    (_, Pacing::AtOnce) => "",
                    (_, Pacing::Delay(_)) => ", delayed",
                    (_, Pacing::SlowHead(_)) => ", slow head",
                    (_, Pacing::Drip(_)) => ", drip-fed body",
                    (_, Pacing::Informational(_)) => ", after a 1xx flood",
                };
                format!("{body}{status}{odd}")
            }
            Behaviour::CloseBeforeHead => "close before the head".to_owned(),
            Behaviour::ResetBeforeHead => "reset before the head".to_owned(),
            Behaviour::ResetAfterHead => "reset after the head".to_owned(),
            Behaviour::Truncate { .. } => "truncated body".to_owned(),
            Behaviour::NotHttp { .. } => "garbage instead of HTTP".to_owned(),
            Behaviour::TwoContentLengths => "two Content-Lengths".to_owned(),
            Behaviour::Hang => "no answer".to_owned(),
        }
    }

    /// The earliest the whole reply can have arrived after the request, or `None` if it never
    /// does.
    pub(super) fn ready_after(&self) -> Option<Duration> {
        match self {
            Behaviour::Hang => None,
            Behaviour::Reply(reply) => Some(match reply.pacing {
                Pacing::AtOnce | Pacing::Informational(_) => Duration::ZERO,
                Pacing::Delay(delay) => delay,
                Pacing::SlowHead(gap) => gap * pieces(&reply.head()),
                Pacing::Drip(gap) => gap * pieces(&reply.body()),
            }),
            _ => Some(Duration::ZERO),
        }
    }

    /// The documented outcome when the reply arrives in time (README, "Errors for clients").
    pub(super) fn expected(&self) -> Outcome {
        let gateway = Outcome::error;
        let lost = gateway(Code::Unknown, "UPSTREAM_CONNECTION_LOST");
        match self {
            Behaviour::Reply(reply) => {
                let fault = |code| {
                    let class = fault::classify(code);
                    Outcome::error(class.grpc_code(), class.reason())
                };
                match (reply.status, reply.body) {
                    (200, Body::Success) => Outcome::Ok,
                    (_, Body::Fault(code)) => fault(code),
                    (200, Body::Garbage(_)) => gateway(Code::Internal, "UPSTREAM_BAD_RESPONSE"),
                    (200, Body::Oversized) => {
                        gateway(Code::Internal, "UPSTREAM_RESPONSE_TOO_LARGE")
                    }
                    // The controller declined, unless the body read is a success reply, which
                    // says it acted; after any other 5xx it may have acted.
                    (429 | 503, Body::Garbage(_) | Body::Oversized) => {
                        gateway(Code::Unavailable, "UPSTREAM_HTTP_ERROR")
                    }
                    (500.., _) => gateway(Code::Unknown, "UPSTREAM_HTTP_ERROR"),
                    (_, _) => gateway(Code::Internal, "UPSTREAM_HTTP_ERROR"),
                }
            }
            Behaviour::CloseBeforeHead
            | Behaviour::ResetBeforeHead
            | Behaviour::ResetAfterHead
            | Behaviour::Truncate { .. }
            | Behaviour::NotHttp { .. }
            | Behaviour::TwoContentLengths => lost,
            Behaviour::Hang => gateway(Code::DeadlineExceeded, "UPSTREAM_TIMEOUT"),
        }
    }
}

/// How many [`PIECE`]s `bytes` is sent in.
fn pieces(bytes: &[u8]) -> u32 {
    bytes.len().div_ceil(PIECE) as u32
}

impl Reply {
    pub(super) fn body(&self) -> Vec<u8> {
        match self.body {
            Body::Success => SUCCESS.to_vec(),
            Body::Fault(code) => {
                format!("<response><fault><code>{code}</code></fault></response>").into_bytes()
            }
            Body::Garbage(seed) => garbage(seed),
            Body::Oversized => {
                let padding = " ".repeat(MAX_RESPONSE_BYTES);
                format!("<response><params/>{padding}</response>").into_bytes()
            }
        }
    }

    /// The framed body: as it is, or as one chunk and the last chunk.
    pub(super) fn framed_body(&self) -> Vec<u8> {
        let body = self.body();
        match self.framing {
            Framing::ContentLength => body,
            Framing::Chunked | Framing::Conflicting => chunked(&body),
        }
    }

    pub(super) fn head(&self) -> Vec<u8> {
        let body = self.body();
        let framing = match self.framing {
            Framing::ContentLength => format!("Content-Length: {}", body.len()),
            Framing::Chunked => "Transfer-Encoding: chunked".to_owned(),
            Framing::Conflicting => format!(
                "Transfer-Encoding: chunked\r\nContent-Length: {}",
                body.len()
            ),
        };
        format!(
            "HTTP/1.1 {} Chaos\r\nContent-Type: application/xml\r\n{framing}\r\n\r\n",
            self.status
        )
        .into_bytes()
    }
}

fn chunked(body: &[u8]) -> Vec<u8> {
    let mut framed = format!("{:x}\r\n", body.len()).into_bytes();
    framed.extend_from_slice(body);
    framed.extend_from_slice(b"\r\n0\r\n\r\n");
    framed
}

/// Up to 512 bytes that are neither a task-interface response nor an HTTP response: the first
/// byte is not `<`, `{` or `H`, whatever follows.
pub(super) fn garbage(seed: u64) -> Vec<u8> {
    let mut random = SplitMix64(seed);
    let mut bytes = vec![0x16];
    bytes.extend((0..random.below(512)).map(|_| random.next() as u8));
    bytes
}

/// Sebastiano Vigna's SplitMix64: a tiny, seedable generator, enough to draw a plan.
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound`.
    pub(super) fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}
