//! tiercache: a Redis (>= 7.0) module for multi-tier caching. This file only registers; see
//! ARCHITECTURE.md for where everything lives.

mod acl;
mod cluster;
mod commands;
mod config;
mod datatype;
mod emit;
mod ffi;
mod kept_ok;
mod keys;
mod leases;
mod propagation;
mod reply;
mod stats;
mod tagindex;

use redis_module::{redis_module, Context, RedisString, Status};

fn init(ctx: &Context, args: &[RedisString]) -> Status {
    let ctx = ctx.ctx;
    let args: Vec<ffi::RStr> = args.iter().map(|a| a.inner).collect();
    let ok = ffi::guard(false, || {
        ffi::install_panic_hook(ctx);
        if let Some(name) = ffi::missing_hot_api() {
            ffi::log(ctx, "warning", &format!("tiercache: this Redis lacks {name} (Redis >= 7.0 is required)"));
            return false;
        }
        // SAFETY: OnLoad context; HANDLE_IO_ERRORS makes truncated RDB payloads an error we check
        // (needed for diskless replica loading).
        unsafe { ffi::api!(RedisModule_SetModuleOptions)(ctx, redis_module::raw::REDISMODULE_OPTIONS_HANDLE_IO_ERRORS as i32) };
        // SAFETY: OnLoad context; replaces the crate's default INFO callback with ours.
        unsafe { ffi::api!(RedisModule_RegisterInfoFunc)(ctx, Some(stats::info)) };
        emit::init();
        reply::init(ctx);
        datatype::register(ctx)
            && config::register(ctx, &args)
            && commands::register(ctx)
            && tagindex::register(ctx)
            && leases::register(ctx)
            && propagation::register(ctx)
            && cluster::register(ctx)
    });
    if ok {
        Status::Ok
    } else {
        Status::Err
    }
}

redis_module! {
    name: "tiercache",
    version: 100,
    allocator: (redis_module::alloc::RedisAlloc, redis_module::alloc::RedisAlloc),
    data_types: [],
    init: init,
}
