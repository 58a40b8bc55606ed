// tests/support/client_helpers.hpp — what the client tests against a real daemon share.
#pragma once

#include <catch2/catch.hpp>

#include <string>
#include <utility>

#include "support/daemon_process.hpp"
#include "tensorreg/client/connection.hpp"
#include "tensorreg/common/thread_pool.hpp"
#include "tensorreg/identity/content_id.hpp"
#include "tensorreg/index/safetensors_bundle.hpp"

namespace tensorreg::testing {

/// The mi2 id of `bundle` as computed here, without a daemon: what a put must answer.
inline std::string offline_id(const index::safetensors_bundle& bundle) {
  thread_pool pool(1);
  return identity::content_id(bundle.index().json(), bundle.canonical(), &pool).value().to_string();
}

/// A connection to `d`; the test stops here when the daemon refuses it.
inline client::connection connect(const daemon_process& d) {
  auto c = client::connection::connect(d.socket_path());
  REQUIRE(c);
  return std::move(*c);
}

}  // namespace tensorreg::testing
