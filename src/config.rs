//! Module configs (Redis 7.0 module config API): `tiercache.compress-min-size`, `tiercache.max-tags`,
//! `tiercache.reclaim-budget`, `tiercache.max-value-size`, `tiercache.max-lease-ms`, `tiercache.max-wait-ms`,
//! `tiercache.cluster-timeout-ms` and the string `tiercache.invalidation-channel`.
//!
//! Each is settable as a loadmodule argument (`compress-min-size 64`, with or without the `tiercache.`
//! prefix), in redis.conf or on the command line (`tiercache.max-tags 8`), and with CONFIG SET. Bounds
//! are enforced by Redis; registration and load-argument errors stop the module from loading.

use std::cell::RefCell;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_longlong, c_void};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use redis_module::raw;
use tiercache_core::num::parse_i64;

use crate::ffi::{api, bytes, free_string, guard, log, new_string, Ctx, RStr, ERR, OK};

/// One numeric config.
pub struct Numeric {
    /// Name without the `tiercache.` prefix.
    pub name: &'static CStr,
    pub min: i64,
    pub max: i64,
    value: AtomicI64,
}

impl Numeric {
    const fn new(name: &'static CStr, default: i64, min: i64, max: i64) -> Self {
        Numeric { name, min, max, value: AtomicI64::new(default) }
    }

    #[inline]
    pub fn get(&self) -> i64 {
        self.value.load(Relaxed)
    }
}

/// Values of at least this many bytes are lz4-compressed when that saves 10 %.
pub static COMPRESS_MIN_SIZE: Numeric = Numeric::new(c"compress-min-size", 1024, 0, 512 * 1024 * 1024);
/// Most tags one entry may carry.
/// The upper bound is the one an RDB load and a replayed SET apply whatever the setting.
pub static MAX_TAGS: Numeric = Numeric::new(c"max-tags", 32, 0, tiercache_core::persist::MAX_PERSISTED_TAGS as i64);

/// Largest decoded value `TIERCACHE.SET` accepts, in bytes: the raw length, or the size an lz4 frame
/// announces (the client's frame is refused before it is decoded). Up to the lz4 frame's hard maximum.
pub static MAX_VALUE_SIZE: Numeric =
    Numeric::new(c"max-value-size", 64 * 1024 * 1024, 1024, tiercache_core::lz4::MAX_ORIGINAL_LEN as i64);

/// Invalidated entries deleted per reclaim tick (a tick also stops after about 1 ms).
pub static RECLAIM_BUDGET: Numeric = Numeric::new(c"reclaim-budget", 1000, 1, 1_000_000);

/// Longest lease a `TIERCACHE.GET ... LEASE ms` may ask for. The command is read-only, so without a
/// cap a read-only user could hold keys (and the module memory of a lease) for as long as it liked.
pub static MAX_LEASE_MS: Numeric = Numeric::new(c"max-lease-ms", 60_000, 1, 86_400_000);
/// Longest `WAIT ms` of a lease read (how long a parked reader may stay parked).
pub static MAX_WAIT_MS: Numeric = Numeric::new(c"max-wait-ms", 60_000, 1, 86_400_000);

/// Redis Cluster: how long a cluster-wide INVALIDATE, TAGCOUNT or TAGKEYS waits for every other master
/// to answer before it replies with an error naming the ones that did not.
pub static CLUSTER_TIMEOUT_MS: Numeric = Numeric::new(c"cluster-timeout-ms", 5_000, 1, 600_000);

static ALL: [&Numeric; 7] =
    [&COMPRESS_MIN_SIZE, &MAX_TAGS, &RECLAIM_BUDGET, &MAX_VALUE_SIZE, &MAX_LEASE_MS, &MAX_WAIT_MS, &CLUSTER_TIMEOUT_MS];

/// Name of the string config holding the invalidation channel.
const CHANNEL: &CStr = c"invalidation-channel";
const CHANNEL_DEFAULT: &CStr = c"tiercache:invalidations";

thread_local! {
    /// The channel as bytes, and as the Redis string CONFIG GET returns (configs change on the main thread).
    static CHANNEL_VALUE: RefCell<(Vec<u8>, RStr)> = RefCell::new((CHANNEL_DEFAULT.to_bytes().to_vec(), std::ptr::null_mut()));
}

/// The channel TIERCACHE.INVALIDATE publishes on; empty: publishing is off.
pub fn invalidation_channel() -> Vec<u8> {
    CHANNEL_VALUE.with(|c| c.borrow().0.clone())
}

unsafe extern "C" fn get_channel(_name: *const c_char, _privdata: *mut c_void) -> RStr {
    guard(std::ptr::null_mut(), || {
        CHANNEL_VALUE.with(|c| {
            let mut c = c.borrow_mut();
            if c.1.is_null() {
                c.1 = new_string(std::ptr::null_mut(), &c.0);
            }
            c.1
        })
    })
}

unsafe extern "C" fn set_channel(_name: *const c_char, val: RStr, _privdata: *mut c_void, _err: *mut RStr) -> c_int {
    guard(ERR, || {
        let v = bytes(val).to_vec();
        CHANNEL_VALUE.with(|c| {
            let mut c = c.borrow_mut();
            if !c.1.is_null() {
                free_string(std::ptr::null_mut(), c.1);
            }
            *c = (v, std::ptr::null_mut());
        });
        OK
    })
}

unsafe extern "C" fn get_numeric(_name: *const c_char, privdata: *mut c_void) -> c_longlong {
    guard(0, || {
        // SAFETY: privdata is the &'static Numeric given at registration.
        let cfg = unsafe { &*privdata.cast::<Numeric>() };
        cfg.get()
    })
}

unsafe extern "C" fn set_numeric(_name: *const c_char, val: c_longlong, privdata: *mut c_void, _err: *mut RStr) -> c_int {
    guard(ERR, || {
        // SAFETY: privdata is the &'static Numeric given at registration; Redis checked the bounds.
        let cfg = unsafe { &*privdata.cast::<Numeric>() };
        cfg.value.store(val, Relaxed);
        OK
    })
}

fn strip(name: &[u8]) -> &[u8] {
    name.strip_prefix(b"tiercache.").unwrap_or(name)
}

fn find(name: &[u8]) -> Option<&'static Numeric> {
    let name = strip(name);
    ALL.iter().copied().find(|c| c.name.to_bytes().eq_ignore_ascii_case(name))
}

/// Applies loadmodule arguments (`name value` pairs), registers every config and loads the values
/// given in redis.conf or on the command line. Returns false (module refuses to load) on any error.
pub fn register(ctx: Ctx, args: &[RStr]) -> bool {
    if !args.len().is_multiple_of(2) {
        log(ctx, "warning", "tiercache: module arguments must be name value pairs, e.g. max-tags 16");
        return false;
    }
    let mut channel_default = CHANNEL_DEFAULT.to_owned();
    for pair in args.chunks(2) {
        let (name, value) = (bytes(pair[0]), bytes(pair[1]));
        if strip(name).eq_ignore_ascii_case(CHANNEL.to_bytes()) {
            match std::ffi::CString::new(value) {
                Ok(v) => channel_default = v,
                Err(_) => {
                    log(ctx, "warning", "tiercache: invalidation-channel must not contain NUL bytes");
                    return false;
                }
            }
            continue;
        }
        let Some(cfg) = find(name) else {
            log(ctx, "warning", &format!("tiercache: unknown module argument '{}'", String::from_utf8_lossy(name)));
            return false;
        };
        match parse_i64(value) {
            Some(v) if (cfg.min..=cfg.max).contains(&v) => cfg.value.store(v, Relaxed),
            _ => {
                log(
                    ctx,
                    "warning",
                    &format!("tiercache: {} must be an integer from {} to {}", cfg.name.to_string_lossy(), cfg.min, cfg.max),
                );
                return false;
            }
        }
    }
    for cfg in ALL {
        // SAFETY: OnLoad context; the name is a C string; privdata points to a 'static config.
        let rc = unsafe {
            api!(RedisModule_RegisterNumericConfig)(
                ctx,
                cfg.name.as_ptr(),
                cfg.get(),
                raw::REDISMODULE_CONFIG_DEFAULT,
                cfg.min,
                cfg.max,
                Some(get_numeric),
                Some(set_numeric),
                None,
                (cfg as *const Numeric).cast_mut().cast(),
            )
        };
        if rc != OK {
            log(ctx, "warning", &format!("tiercache: cannot register config {}", cfg.name.to_string_lossy()));
            return false;
        }
    }
    CHANNEL_VALUE.with(|c| c.borrow_mut().0 = channel_default.to_bytes().to_vec());
    // SAFETY: OnLoad context; the default is a C string Redis copies; the callbacks are valid extern fns.
    let rc = unsafe {
        api!(RedisModule_RegisterStringConfig)(
            ctx,
            CHANNEL.as_ptr(),
            channel_default.as_ptr(),
            raw::REDISMODULE_CONFIG_DEFAULT,
            Some(get_channel),
            Some(set_channel),
            None,
            std::ptr::null_mut(),
        )
    };
    if rc != OK {
        log(ctx, "warning", "tiercache: cannot register config invalidation-channel");
        return false;
    }
    // SAFETY: OnLoad context, after every config is registered.
    if unsafe { api!(RedisModule_LoadConfigs)(ctx) } == ERR {
        log(ctx, "warning", "tiercache: invalid tiercache.* value in the server configuration");
        return false;
    }
    true
}
