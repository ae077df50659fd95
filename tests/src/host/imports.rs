//! The functions the filter imports: the proxy-wasm 0.2.1 hostcalls under
//! `env` and a handful of deterministic WASI preview1 stubs.
//!
//! Status codes and edge cases follow proxy-wasm-cpp-host's `exports.cc` and
//! Envoy's `Context`; anything not defined here is linked as a trap by
//! [`super::Host::load`], so a filter that starts using a new hostcall fails
//! its tests loudly instead of getting a made-up answer.

use std::time::Duration;

use wasmtime::{Caller, Extern, Linker};

use super::abi::{
    deserialize_pairs, len_u32, serialize_pairs, split_path, BufferType, LogLevel, MapType, MetricType, Status,
};
use super::local_reply::LocalReply;
use super::shared::lock;
use super::state::VmState;
use super::stream::{self, read_range, StreamEvent, StreamState};
use super::LogLine;

/// A hostcall either answers with a status, or the VM must trap (its
/// allocator trapped, or it broke the ABI so badly that Envoy would abort).
enum Abort {
    Status(Status),
    Trap(wasmtime::Error),
}

impl From<Status> for Abort {
    fn from(status: Status) -> Abort {
        Abort::Status(status)
    }
}

impl From<wasmtime::Error> for Abort {
    fn from(error: wasmtime::Error) -> Abort {
        Abort::Trap(error)
    }
}

type Hostcall<T = ()> = Result<T, Abort>;
type Ctx<'a> = Caller<'a, VmState>;

/// Notes a hostcall and the fuel burnt so far, when the VM traces them.
fn trace(c: &Ctx<'_>, name: &'static str) {
    if let Some(trace) = c.data().trace.as_ref() {
        let fuel = c.get_fuel().unwrap_or(0);
        trace.borrow_mut().push((name, fuel));
    }
}

fn answer(result: Hostcall) -> wasmtime::Result<u32> {
    match result {
        Ok(()) => Ok(Status::Ok as u32),
        Err(Abort::Status(status)) => Ok(status as u32),
        Err(Abort::Trap(error)) => Err(error),
    }
}

fn memory(caller: &mut Ctx<'_>) -> Hostcall<wasmtime::Memory> {
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| Abort::Trap(wasmtime::Error::msg("the filter exports no `memory`")))
}

fn read(caller: &mut Ctx<'_>, ptr: u32, len: u32) -> Hostcall<Vec<u8>> {
    let memory = memory(caller)?;
    let start = ptr as usize;
    let end = start.checked_add(len as usize).ok_or(Status::InvalidMemoryAccess)?;
    memory.data(&*caller).get(start..end).map(<[u8]>::to_vec).ok_or(Abort::Status(Status::InvalidMemoryAccess))
}

fn write(caller: &mut Ctx<'_>, ptr: u32, bytes: &[u8]) -> Hostcall {
    let memory = memory(caller)?;
    memory.write(&mut *caller, ptr as usize, bytes).map_err(|_| Abort::Status(Status::InvalidMemoryAccess))
}

fn write_u32(caller: &mut Ctx<'_>, ptr: u32, value: u32) -> Hostcall {
    write(caller, ptr, &value.to_le_bytes())
}

fn write_u64(caller: &mut Ctx<'_>, ptr: u32, value: u64) -> Hostcall {
    write(caller, ptr, &value.to_le_bytes())
}

/// Copies `bytes` into memory the filter allocates and owns afterwards
/// (cpp-host `copyToPointerSize`): an empty value is a null pointer.
fn hand_over(caller: &mut Ctx<'_>, bytes: &[u8], ptr_ptr: u32, size_ptr: u32) -> Hostcall {
    let mut ptr = 0;
    if !bytes.is_empty() {
        let allocate = caller
            .get_export("proxy_on_memory_allocate")
            .or_else(|| caller.get_export("malloc"))
            .and_then(Extern::into_func)
            .ok_or_else(|| {
                Abort::Trap(wasmtime::Error::msg("the filter exports neither `proxy_on_memory_allocate` nor `malloc`"))
            })?;
        let allocate = allocate.typed::<u32, u32>(&*caller)?;
        ptr = allocate.call(&mut *caller, len_u32(bytes.len()))?;
        if ptr == 0 {
            return Err(Status::InvalidMemoryAccess.into());
        }
        write(caller, ptr, bytes)?;
    }
    write_u32(caller, ptr_ptr, ptr)?;
    write_u32(caller, size_ptr, len_u32(bytes.len()))
}

/// The stream whose callback is running (or which the filter selected with
/// `proxy_set_effective_context`); `None` in the root context.
fn stream<'a>(caller: &'a mut Ctx<'_>) -> Option<&'a mut StreamState> {
    let state = caller.data_mut();
    let active = state.active;
    state.streams.get_mut(&active)
}

/// `proxy_add_header_map_value` and `proxy_replace_header_map_value`: read the
/// key and value from guest memory and apply `edit` to the writable map.
fn edit_map(
    c: &mut Ctx<'_>,
    kind: u32,
    (key_ptr, key_size): (u32, u32),
    (ptr, size): (u32, u32),
    edit: fn(&mut super::abi::Pairs, &[u8], &[u8]),
) -> Hostcall {
    let kind = map_type(kind)?;
    let key = read(c, key_ptr, key_size)?;
    let value = read(c, ptr, size)?;
    let map = stream(c).ok_or(Status::BadArgument)?.write_map(kind)?;
    edit(map, &key, &value);
    Ok(())
}

fn map_type(value: u32) -> Hostcall<MapType> {
    MapType::from_abi(value).ok_or(Abort::Status(Status::BadArgument))
}

pub(crate) fn link_env(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap("env", "proxy_log", |mut c: Ctx<'_>, level: u32, ptr: u32, len: u32| {
        trace(&c, "proxy_log");
        answer((|| {
            let level = LogLevel::from_abi(level).ok_or(Status::BadArgument)?;
            let message = String::from_utf8_lossy(&read(&mut c, ptr, len)?).into_owned();
            c.data_mut().logs.push(LogLine { level, message });
            Ok(())
        })())
    })?;
    linker.func_wrap("env", "proxy_get_log_level", |mut c: Ctx<'_>, ptr: u32| {
        trace(&c, "proxy_get_log_level");
        answer(write_u32(&mut c, ptr, LogLevel::Info as u32))
    })?;
    linker.func_wrap("env", "proxy_get_current_time_nanoseconds", |mut c: Ctx<'_>, ptr: u32| {
        trace(&c, "proxy_get_current_time_nanoseconds");
        let now = c.data().process.clock.realtime_nanos();
        answer(write_u64(&mut c, ptr, now))
    })?;
    linker.func_wrap("env", "proxy_set_tick_period_milliseconds", |mut c: Ctx<'_>, period: u32| {
        trace(&c, "proxy_set_tick_period_milliseconds");
        c.data_mut().tick_period = Some(Duration::from_millis(u64::from(period)));
        Ok(Status::Ok as u32)
    })?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Ctx<'_>, kind: u32, start: u32, len: u32, ptr_ptr: u32, size_ptr: u32| {
            trace(&c, "proxy_get_buffer_bytes");
            answer((|| {
                let kind = BufferType::from_abi(kind).ok_or(Status::BadArgument)?;
                let state = c.data_mut();
                let bytes = match kind {
                    BufferType::PluginConfiguration => {
                        let config = state.configuring.then_some(&state.plugin_config[..]);
                        read_range(config, start as usize, len as usize)?.map(<[u8]>::to_vec)
                    }
                    BufferType::VmConfiguration => None,
                    BufferType::Unavailable => return Err(Status::NotFound.into()),
                    BufferType::HttpRequestBody | BufferType::HttpResponseBody => {
                        let active = state.active;
                        let body = state.streams.get(&active).and_then(|s| s.body(kind)).ok_or(Status::NotFound)?;
                        body.read(start as usize, len as usize)?.map(<[u8]>::to_vec)
                    }
                };
                match bytes {
                    Some(bytes) => hand_over(&mut c, &bytes, ptr_ptr, size_ptr),
                    None => Ok(()),
                }
            })())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Ctx<'_>, kind: u32, start: u32, len: u32, ptr: u32, size: u32| {
            trace(&c, "proxy_set_buffer_bytes");
            answer((|| {
                let kind = BufferType::from_abi(kind).ok_or(Status::BadArgument)?;
                let data = read(&mut c, ptr, size)?;
                match kind {
                    BufferType::HttpRequestBody | BufferType::HttpResponseBody => {
                        let body = stream(&mut c).and_then(|s| s.body_mut(kind)).ok_or(Status::NotFound)?;
                        Ok(body.write(start as usize, len as usize, &data)?)
                    }
                    // Configuration is read-only (cpp-host `BufferBase::copyFrom`).
                    _ => Err(Status::Unimplemented.into()),
                }
            })())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Ctx<'_>, kind: u32, ptr_ptr: u32, size_ptr: u32| {
            trace(&c, "proxy_get_header_map_pairs");
            answer((|| {
                if kind > 7 {
                    return Err(Status::BadArgument.into());
                }
                // Envoy serializes an unreachable map as an empty one.
                let pairs = MapType::from_abi(kind)
                    .and_then(|kind| stream(&mut c).and_then(|s| s.read_map(kind).ok().cloned()))
                    .unwrap_or_default();
                let bytes = if pairs.is_empty() { Vec::new() } else { serialize_pairs(&pairs) };
                hand_over(&mut c, &bytes, ptr_ptr, size_ptr)
            })())
        },
    )?;
    linker.func_wrap("env", "proxy_set_header_map_pairs", |mut c: Ctx<'_>, kind: u32, ptr: u32, size: u32| {
        trace(&c, "proxy_set_header_map_pairs");
        answer((|| {
            let kind = map_type(kind)?;
            let pairs = deserialize_pairs(&read(&mut c, ptr, size)?).ok_or(Status::BadArgument)?;
            let map = stream(&mut c).ok_or(Status::BadArgument)?.write_map(kind)?;
            map.clear();
            for (name, value) in &pairs {
                stream::add(map, name, value);
            }
            Ok(())
        })())
    })?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Ctx<'_>, kind: u32, key_ptr: u32, key_size: u32, ptr_ptr: u32, size_ptr: u32| {
            trace(&c, "proxy_get_header_map_value");
            answer((|| {
                let kind = map_type(kind)?;
                let key = read(&mut c, key_ptr, key_size)?;
                let map = stream(&mut c).ok_or(Status::BadArgument)?.read_map(kind)?;
                let value = stream::first_value(map, &key).ok_or(Status::NotFound)?.to_vec();
                hand_over(&mut c, &value, ptr_ptr, size_ptr)
            })())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Ctx<'_>, kind: u32, key_ptr: u32, key_size: u32| {
            trace(&c, "proxy_remove_header_map_value");
            answer((|| {
                let kind = map_type(kind)?;
                let key = read(&mut c, key_ptr, key_size)?;
                let map = stream(&mut c).ok_or(Status::BadArgument)?.write_map(kind)?;
                stream::remove(map, &key);
                Ok(())
            })())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: Ctx<'_>, kind: u32, key_ptr: u32, key_size: u32, ptr: u32, size: u32| {
            trace(&c, "proxy_replace_header_map_value");
            answer(edit_map(&mut c, kind, (key_ptr, key_size), (ptr, size), stream::replace))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: Ctx<'_>, kind: u32, key_ptr: u32, key_size: u32, ptr: u32, size: u32| {
            trace(&c, "proxy_add_header_map_value");
            answer(edit_map(&mut c, kind, (key_ptr, key_size), (ptr, size), stream::add))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Ctx<'_>, path_ptr: u32, path_size: u32, ptr_ptr: u32, size_ptr: u32| {
            trace(&c, "proxy_get_property");
            answer((|| {
                let path = split_path(&read(&mut c, path_ptr, path_size)?);
                let stream = stream(&mut c).ok_or(Status::NotFound)?;
                let value = stream
                    .host_properties
                    .get(&path)
                    .or_else(|| stream.filter_properties.get(&path))
                    .ok_or(Status::NotFound)?
                    .clone();
                hand_over(&mut c, &value, ptr_ptr, size_ptr)
            })())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: Ctx<'_>, path_ptr: u32, path_size: u32, ptr: u32, size: u32| {
            trace(&c, "proxy_set_property");
            answer((|| {
                let path = split_path(&read(&mut c, path_ptr, path_size)?);
                let value = read(&mut c, ptr, size)?;
                // Envoy stores it as filter state: there is none in the root context.
                let stream = stream(&mut c).ok_or(Status::NotFound)?;
                stream.filter_properties.insert(path, value);
                Ok(())
            })())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Ctx<'_>, key_ptr: u32, key_size: u32, ptr_ptr: u32, size_ptr: u32, cas_ptr: u32| {
            trace(&c, "proxy_get_shared_data");
            answer((|| {
                let key = read(&mut c, key_ptr, key_size)?;
                let (value, cas) = lock(&c.data().process.shared_data).get(&key)?;
                hand_over(&mut c, &value, ptr_ptr, size_ptr)?;
                write_u32(&mut c, cas_ptr, cas)
            })())
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Ctx<'_>, key_ptr: u32, key_size: u32, ptr: u32, size: u32, cas: u32| {
            trace(&c, "proxy_set_shared_data");
            answer((|| {
                let key = read(&mut c, key_ptr, key_size)?;
                let value = read(&mut c, ptr, size)?;
                Ok(lock(&c.data().process.shared_data).set(&key, &value, cas)?)
            })())
        },
    )?;
    linker.func_wrap("env", "proxy_continue_stream", |mut c: Ctx<'_>, kind: u32| {
        trace(&c, "proxy_continue_stream");
        answer((|| {
            let event = match kind {
                0 => StreamEvent::ContinueRequest,
                1 => StreamEvent::ContinueResponse,
                2 => return Ok(()),
                3 => return Err(Status::Unimplemented.into()),
                _ => return Err(Status::BadArgument.into()),
            };
            if let Some(stream) = stream(&mut c) {
                stream.events.push(event);
                stream.resume();
            }
            Ok(())
        })())
    })?;
    linker.func_wrap("env", "proxy_close_stream", |mut c: Ctx<'_>, kind: u32| {
        trace(&c, "proxy_close_stream");
        answer((|| {
            let event = match kind {
                0 => StreamEvent::CloseRequest,
                1 => StreamEvent::CloseResponse,
                2 | 3 => return Ok(()),
                _ => return Err(Status::BadArgument.into()),
            };
            if let Some(stream) = stream(&mut c) {
                stream.events.push(event);
            }
            Ok(())
        })())
    })?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Ctx<'_>,
         status: u32,
         details_ptr: u32,
         details_size: u32,
         body_ptr: u32,
         body_size: u32,
         headers_ptr: u32,
         headers_size: u32,
         grpc_status: i32| {
            trace(&c, "proxy_send_local_response");
            answer((|| {
                let details = read(&mut c, details_ptr, details_size)?;
                let body = read(&mut c, body_ptr, body_size)?;
                let headers =
                    deserialize_pairs(&read(&mut c, headers_ptr, headers_size)?).ok_or(Status::BadArgument)?;
                let reply = LocalReply::new(status, &details, &body, &headers, grpc_status);
                // Without a stream (root context) Envoy has nobody to answer.
                if let Some(stream) = stream(&mut c) {
                    stream.pending_local_reply = Some(reply);
                }
                Ok(())
            })())
        },
    )?;
    linker.func_wrap("env", "proxy_set_effective_context", |mut c: Ctx<'_>, id: u32| {
        trace(&c, "proxy_set_effective_context");
        let state = c.data_mut();
        if id == state.root_id || state.streams.contains_key(&id) {
            state.active = id;
            Ok(Status::Ok as u32)
        } else {
            Ok(Status::BadArgument as u32)
        }
    })?;
    linker.func_wrap("env", "proxy_done", |_: Ctx<'_>| Ok(Status::Ok as u32))?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Ctx<'_>, kind: u32, name_ptr: u32, name_size: u32, id_ptr: u32| {
            trace(&c, "proxy_define_metric");
            answer((|| {
                let kind = MetricType::from_abi(kind).ok_or(Status::BadArgument)?;
                let name = String::from_utf8_lossy(&read(&mut c, name_ptr, name_size)?).into_owned();
                let id = lock(&c.data().process.metrics).define(kind, &name);
                write_u32(&mut c, id_ptr, id)
            })())
        },
    )?;
    linker.func_wrap("env", "proxy_get_metric", |mut c: Ctx<'_>, id: u32, value_ptr: u32| {
        trace(&c, "proxy_get_metric");
        answer((|| {
            let value = lock(&c.data().process.metrics).get(id)?;
            write_u64(&mut c, value_ptr, value)
        })())
    })?;
    linker.func_wrap("env", "proxy_record_metric", |c: Ctx<'_>, id: u32, value: u64| {
        trace(&c, "proxy_record_metric");
        answer(lock(&c.data().process.metrics).record(id, value).map_err(Abort::from))
    })?;
    linker.func_wrap("env", "proxy_increment_metric", |c: Ctx<'_>, id: u32, offset: i64| {
        trace(&c, "proxy_increment_metric");
        answer(lock(&c.data().process.metrics).increment(id, offset).map_err(Abort::from))
    })?;
    linker.func_wrap("env", "proxy_get_configuration", |mut c: Ctx<'_>, ptr_ptr: u32, size_ptr: u32| {
        trace(&c, "proxy_get_configuration");
        // Envoy: the plugin configuration while configuring, else the
        // (empty) VM configuration.
        let state = c.data();
        let config = if state.configuring { state.plugin_config.clone() } else { Vec::new() };
        answer(hand_over(&mut c, &config, ptr_ptr, size_ptr))
    })?;
    Ok(())
}

/// WASI preview1 errno values used below.
const ERRNO_SUCCESS: u32 = 0;
const ERRNO_INVAL: u32 = 28;
const ERRNO_FAULT: u32 = 21;

fn errno(result: Hostcall) -> wasmtime::Result<u32> {
    match result {
        Ok(()) => Ok(ERRNO_SUCCESS),
        Err(Abort::Status(_)) => Ok(ERRNO_FAULT),
        Err(Abort::Trap(error)) => Err(error),
    }
}

pub(crate) fn link_wasi(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    const WASI: &str = "wasi_snapshot_preview1";
    // Output is dropped: the filter's voice is `proxy_log`. The byte count is
    // reported so std's writers do not retry forever.
    linker.func_wrap(WASI, "fd_write", |mut c: Ctx<'_>, _fd: u32, iovs: u32, iovs_len: u32, written_ptr: u32| {
        errno((|| {
            let table = read(&mut c, iovs, iovs_len.saturating_mul(8))?;
            let written: u32 = table
                .chunks_exact(8)
                .filter_map(|iov| iov.get(4..8)?.try_into().ok().map(u32::from_le_bytes))
                .fold(0, u32::saturating_add);
            write_u32(&mut c, written_ptr, written)
        })())
    })?;
    linker.func_wrap(WASI, "random_get", |mut c: Ctx<'_>, ptr: u32, len: u32| {
        let bytes = c.data_mut().random_bytes(len as usize);
        errno(write(&mut c, ptr, &bytes))
    })?;
    linker.func_wrap(WASI, "clock_time_get", |mut c: Ctx<'_>, id: u32, _precision: u64, time_ptr: u32| {
        let clock = &c.data().process.clock;
        let now = match id {
            0 => clock.realtime_nanos(),
            1..=3 => clock.monotonic_nanos(),
            _ => return Ok(ERRNO_INVAL),
        };
        errno(write_u64(&mut c, time_ptr, now))
    })?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        linker.func_wrap(WASI, name, |mut c: Ctx<'_>, count_ptr: u32, size_ptr: u32| {
            errno((|| {
                write_u32(&mut c, count_ptr, 0)?;
                write_u32(&mut c, size_ptr, 0)
            })())
        })?;
    }
    for name in ["environ_get", "args_get"] {
        linker.func_wrap(WASI, name, |_: Ctx<'_>, _: u32, _: u32| Ok(ERRNO_SUCCESS))?;
    }
    linker.func_wrap(WASI, "proc_exit", |_: Ctx<'_>, code: u32| -> wasmtime::Result<()> {
        Err(wasmtime::Error::msg(format!("the filter called proc_exit({code})")))
    })?;
    Ok(())
}
