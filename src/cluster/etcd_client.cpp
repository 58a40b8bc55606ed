// src/cluster/etcd_client.cpp — etcd's v3 JSON gateway over libcurl (docs/cluster.md §1).
#include "tensorreg/cluster/etcd_client.hpp"

#include <curl/curl.h>
#include <fmt/format.h>

#include <array>
#include <atomic>
#include <charconv>
#include <mutex>
#include <nlohmann/json.hpp>

namespace tensorreg::cluster {

namespace {

using json = nlohmann::json;

constexpr std::string_view base64_alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

bool prefix_char(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
         c == '_' || c == '/';
}

// The smallest key greater than every key starting with `prefix` (etcd's range_end for a
// prefix): the prefix with its last byte below 0xff incremented and the rest dropped.
std::string prefix_end(std::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    auto last = static_cast<unsigned char>(end.back());
    if (last < 0xff) {
      end.back() = static_cast<char>(last + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');  // every key
}

// etcd's gateway writes int64 as JSON strings; accept numbers too.
std::int64_t json_int(const json& object, const char* name) {
  auto it = object.find(name);
  if (it == object.end()) return 0;
  if (it->is_number_integer()) return it->get<std::int64_t>();
  if (it->is_string()) {
    const auto& text = it->get_ref<const std::string&>();
    std::int64_t value = 0;
    std::from_chars(text.data(), text.data() + text.size(), value);
    return value;
  }
  return 0;
}

std::size_t collect_body(char* data, std::size_t size, std::size_t count, void* user) {
  static_cast<std::string*>(user)->append(data, size * count);
  return size * count;
}

// The request both a call and a watch make: `body` POSTed to `url`, the answer's bytes handed
// to `sink` with `sink_data`, libcurl's error text in `error_text`.
void set_post(CURL* curl, const std::string& url, const std::string& body, curl_write_callback sink, void* sink_data,
              char* error_text) {
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_POST, 1L);
  curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body.c_str());
  curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, static_cast<long>(body.size()));
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, sink);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, sink_data);
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, error_text);
}

std::once_flag curl_global_once;
CURLcode curl_global_result = CURLE_OK;

}  // namespace

std::string cluster_url::endpoint() const { return fmt::format("http://{}:{}", host, port); }

result<cluster_url> parse_cluster_url(std::string_view text) {
  constexpr std::string_view scheme = "etcd://";
  if (!text.starts_with(scheme)) {
    return fail(errc::invalid_argument, fmt::format("cannot parse cluster url '{}': it must start with etcd://", text));
  }
  auto rest = text.substr(scheme.size());
  auto slash = rest.find('/');
  auto authority = rest.substr(0, slash);
  cluster_url url;
  url.prefix = slash == std::string_view::npos ? std::string("/tensorreg") : std::string(rest.substr(slash));
  while (url.prefix.size() > 1 && url.prefix.back() == '/') url.prefix.pop_back();
  if (url.prefix == "/") url.prefix = "/tensorreg";
  for (char c : url.prefix) {
    if (!prefix_char(c)) {
      return fail(errc::invalid_argument,
                  fmt::format("cannot parse cluster url '{}': prefix '{}' has a character outside [A-Za-z0-9-._/]",
                              text, url.prefix));
    }
  }
  auto colon = authority.rfind(':');
  url.host = std::string(authority.substr(0, colon));
  if (colon != std::string_view::npos) {
    auto port_text = authority.substr(colon + 1);
    unsigned port = 0;
    auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (ec != std::errc{} || end != port_text.data() + port_text.size() || port == 0 || port > 65535) {
      return fail(errc::invalid_argument,
                  fmt::format("cannot parse cluster url '{}': port '{}' is not in 1..65535", text, port_text));
    }
    url.port = static_cast<std::uint16_t>(port);
  }
  if (url.host.empty()) {
    return fail(errc::invalid_argument, fmt::format("cannot parse cluster url '{}': empty host", text));
  }
  for (char c : url.host) {
    if (!prefix_char(c) || c == '/') {
      return fail(
          errc::invalid_argument,
          fmt::format("cannot parse cluster url '{}': host '{}' is not a name or IPv4 address", text, url.host));
    }
  }
  return url;
}

std::string base64_encode(std::string_view bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    std::uint32_t n = (std::uint32_t{static_cast<unsigned char>(bytes[i])} << 16) |
                      (std::uint32_t{static_cast<unsigned char>(bytes[i + 1])} << 8) |
                      std::uint32_t{static_cast<unsigned char>(bytes[i + 2])};
    out += base64_alphabet[(n >> 18) & 63];
    out += base64_alphabet[(n >> 12) & 63];
    out += base64_alphabet[(n >> 6) & 63];
    out += base64_alphabet[n & 63];
  }
  if (auto left = bytes.size() - i; left > 0) {
    std::uint32_t n = std::uint32_t{static_cast<unsigned char>(bytes[i])} << 16;
    if (left == 2) n |= std::uint32_t{static_cast<unsigned char>(bytes[i + 1])} << 8;
    out += base64_alphabet[(n >> 18) & 63];
    out += base64_alphabet[(n >> 12) & 63];
    out += left == 2 ? base64_alphabet[(n >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

result<std::string> base64_decode(std::string_view text) {
  if (text.size() % 4 != 0) {
    return fail(errc::invalid_argument,
                fmt::format("cannot decode base64: length {} is not a multiple of 4", text.size()));
  }
  std::string out;
  out.reserve(text.size() / 4 * 3);
  for (std::size_t i = 0; i < text.size(); i += 4) {
    std::uint32_t n = 0;
    int pad = 0;
    for (std::size_t j = 0; j < 4; ++j) {
      char c = text[i + j];
      std::uint32_t v = 0;
      if (c == '=' && i + 4 == text.size() && j >= 2) {
        ++pad;
      } else {
        auto pos = base64_alphabet.find(c);
        if (pos == std::string_view::npos || pad > 0) {
          return fail(errc::invalid_argument, fmt::format("cannot decode base64: bad character at {}", i + j));
        }
        v = static_cast<std::uint32_t>(pos);
      }
      n = (n << 6) | v;
    }
    out += static_cast<char>((n >> 16) & 0xff);
    if (pad < 2) out += static_cast<char>((n >> 8) & 0xff);
    if (pad < 1) out += static_cast<char>(n & 0xff);
  }
  return out;
}

struct etcd_client::state {
  etcd_options options;
  std::mutex mutex;  // one easy handle: libcurl handles are not shared between threads
  CURL* curl = nullptr;
  curl_slist* headers = nullptr;

  ~state() {
    if (headers != nullptr) curl_slist_free_all(headers);
    if (curl != nullptr) curl_easy_cleanup(curl);
  }

  tl::unexpected<error> unreachable(std::string_view reason) const {
    return fail(errc::unavailable, fmt::format("cluster catalogue at {} unreachable: {}", options.endpoint, reason));
  }

  // POSTs `body` to `path` and returns the parsed answer. Gateway errors come back as errors:
  // gRPC code 5 → NOT_FOUND, 14 or an HTTP 5xx → UNAVAILABLE, anything else → INTERNAL.
  result<json> call(std::string_view path, const json& body) {
    std::lock_guard lock(mutex);
    const std::string url = options.endpoint + std::string(path);
    const std::string request = body.dump();
    std::string answer;
    std::array<char, CURL_ERROR_SIZE> error_text{};
    set_post(curl, url, request, &collect_body, &answer, error_text.data());
    auto code = curl_easy_perform(curl);
    if (code != CURLE_OK) {
      return unreachable(error_text[0] != '\0' ? std::string_view(error_text.data()) : curl_easy_strerror(code));
    }
    long http = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &http);
    json parsed = json::parse(answer, nullptr, /*allow_exceptions=*/false);
    if (http >= 500 && (parsed.is_discarded() || json_int(parsed, "code") == 0)) {
      return unreachable(fmt::format("HTTP {} on {}", http, path));
    }
    if (parsed.is_discarded() || !parsed.is_object()) {
      return fail(errc::internal,
                  fmt::format("cannot read the answer of {} to {}: HTTP {}, not JSON", options.endpoint, path, http));
    }
    // Streamed calls (lease keep-alive) wrap the answer in "result" or an "error" object.
    if (auto it = parsed.find("error"); it != parsed.end() && it->is_object()) parsed = *it;
    if (http != 200 || parsed.contains("error") || parsed.contains("grpc_code")) {
      std::int64_t grpc = json_int(parsed, "code");
      if (grpc == 0) grpc = json_int(parsed, "grpc_code");
      std::string message = parsed.value("message", parsed.value("error", std::string("no message")));
      auto kind = grpc == 5 ? errc::not_found : grpc == 14 ? errc::unavailable : errc::internal;
      if (kind == errc::unavailable) return unreachable(message);
      return fail(kind, fmt::format("etcd at {} refused {}: {}", options.endpoint, path, message));
    }
    if (auto it = parsed.find("result"); it != parsed.end() && it->is_object()) return *it;
    return parsed;
  }
};

result<std::unique_ptr<etcd_client>> etcd_client::create(etcd_options options) {
  if (!options.endpoint.starts_with("http://")) {
    return fail(errc::invalid_argument,
                fmt::format("cannot create etcd client: endpoint '{}' is not http://host:port", options.endpoint));
  }
  std::call_once(curl_global_once, [] { curl_global_result = curl_global_init(CURL_GLOBAL_DEFAULT); });
  if (curl_global_result != CURLE_OK) {
    return fail(errc::internal,
                fmt::format("cannot create etcd client: libcurl: {}", curl_easy_strerror(curl_global_result)));
  }
  auto s = std::make_unique<state>();
  s->options = std::move(options);
  s->curl = curl_easy_init();
  if (s->curl == nullptr) return fail(errc::internal, "cannot create etcd client: curl_easy_init failed");
  s->headers = curl_slist_append(nullptr, "Content-Type: application/json");
  curl_easy_setopt(s->curl, CURLOPT_HTTPHEADER, s->headers);
  curl_easy_setopt(s->curl, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(s->options.connect_timeout.count()));
  curl_easy_setopt(s->curl, CURLOPT_TIMEOUT_MS, static_cast<long>(s->options.request_timeout.count()));
  // No signals from libcurl: the daemon has threads, and its resolver must not longjmp.
  curl_easy_setopt(s->curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(s->curl, CURLOPT_PROXY, "");
  return std::unique_ptr<etcd_client>(new etcd_client(std::move(s)));
}

etcd_client::etcd_client(std::unique_ptr<state> s) noexcept : state_(std::move(s)) {}
etcd_client::~etcd_client() = default;

const std::string& etcd_client::endpoint() const noexcept { return state_->options.endpoint; }

status etcd_client::put(std::string_view key, std::string_view value, std::int64_t lease) {
  json body = {{"key", base64_encode(key)}, {"value", base64_encode(value)}};
  if (lease != 0) body["lease"] = std::to_string(lease);
  TENSORREG_TRY(state_->call("/v3/kv/put", body));
  return {};
}

result<bool> etcd_client::put_if_absent(std::string_view key, std::string_view value) {
  const auto key64 = base64_encode(key);
  json body = {
      {"compare", json::array({{{"key", key64}, {"result", "EQUAL"}, {"target", "CREATE"}, {"create_revision", "0"}}})},
      {"success", json::array({{{"request_put", {{"key", key64}, {"value", base64_encode(value)}}}}})}};
  TENSORREG_TRY_ASSIGN(auto answer, state_->call("/v3/kv/txn", body));
  return answer.value("succeeded", false);
}

namespace {

result<std::vector<key_value>> read_kvs(const json& answer, const std::string& endpoint) {
  std::vector<key_value> out;
  auto it = answer.find("kvs");
  if (it == answer.end()) return out;
  if (!it->is_array())
    return fail(errc::internal, fmt::format("cannot read range answer of {}: kvs is not a list", endpoint));
  for (const auto& entry : *it) {
    key_value kv;
    auto key = base64_decode(entry.value("key", std::string()));
    auto value = base64_decode(entry.value("value", std::string()));
    if (!key || !value) {
      return fail(errc::internal,
                  fmt::format("cannot read range answer of {}: a key or value is not base64", endpoint));
    }
    kv.key = std::move(*key);
    kv.value = std::move(*value);
    kv.lease = json_int(entry, "lease");
    kv.mod_revision = json_int(entry, "mod_revision");
    out.push_back(std::move(kv));
  }
  return out;
}

}  // namespace

result<std::optional<key_value>> etcd_client::get(std::string_view key) {
  TENSORREG_TRY_ASSIGN(auto answer, state_->call("/v3/kv/range", json{{"key", base64_encode(key)}}));
  TENSORREG_TRY_ASSIGN(auto kvs, read_kvs(answer, state_->options.endpoint));
  if (kvs.empty()) return std::optional<key_value>{};
  return std::optional<key_value>{std::move(kvs.front())};
}

result<std::vector<std::optional<key_value>>> etcd_client::get_many(std::span<const std::string> keys) {
  constexpr std::size_t ops_per_txn = 128;
  std::vector<std::optional<key_value>> out;
  out.reserve(keys.size());
  for (std::size_t first = 0; first < keys.size(); first += ops_per_txn) {
    const auto batch = keys.subspan(first, std::min(ops_per_txn, keys.size() - first));
    json ranges = json::array();
    for (const auto& key : batch) ranges.push_back({{"request_range", {{"key", base64_encode(key)}}}});
    TENSORREG_TRY_ASSIGN(auto answer,
                         state_->call("/v3/kv/txn", json{{"compare", json::array()}, {"success", std::move(ranges)}}));
    auto responses = answer.find("responses");
    if (responses == answer.end() || !responses->is_array() || responses->size() != batch.size()) {
      return fail(
          errc::internal,
          fmt::format("cannot read the txn answer of {}: {} ranges asked, {} answered", state_->options.endpoint,
                      batch.size(), responses != answer.end() && responses->is_array() ? responses->size() : 0));
    }
    for (const auto& response : *responses) {
      const auto range = response.find("response_range");
      if (range == response.end() || !range->is_object()) {
        return fail(errc::internal, fmt::format("cannot read the txn answer of {}: a response is not a range",
                                                state_->options.endpoint));
      }
      TENSORREG_TRY_ASSIGN(auto kvs, read_kvs(*range, state_->options.endpoint));
      out.push_back(kvs.empty() ? std::nullopt : std::optional<key_value>{std::move(kvs.front())});
    }
  }
  return out;
}

result<std::vector<key_value>> etcd_client::list(std::string_view prefix) {
  json body = {{"key", base64_encode(prefix)}, {"range_end", base64_encode(prefix_end(prefix))}};
  TENSORREG_TRY_ASSIGN(auto answer, state_->call("/v3/kv/range", body));
  return read_kvs(answer, state_->options.endpoint);
}

result<std::int64_t> etcd_client::delete_prefix(std::string_view prefix) {
  json body = {{"key", base64_encode(prefix)}, {"range_end", base64_encode(prefix_end(prefix))}};
  TENSORREG_TRY_ASSIGN(auto answer, state_->call("/v3/kv/deleterange", body));
  return json_int(answer, "deleted");
}

result<bool> etcd_client::delete_key(std::string_view key) {
  TENSORREG_TRY_ASSIGN(auto answer, state_->call("/v3/kv/deleterange", json{{"key", base64_encode(key)}}));
  return json_int(answer, "deleted") > 0;
}

result<std::int64_t> etcd_client::grant_lease(std::chrono::seconds ttl) {
  if (ttl.count() < 1) {
    return fail(errc::invalid_argument, fmt::format("cannot grant lease: ttl {} s is below 1 s", ttl.count()));
  }
  TENSORREG_TRY_ASSIGN(auto answer, state_->call("/v3/lease/grant", json{{"TTL", std::to_string(ttl.count())}}));
  auto id = json_int(answer, "ID");
  if (id == 0) return fail(errc::internal, fmt::format("cannot grant lease: {} answered no lease id", endpoint()));
  return id;
}

result<std::chrono::seconds> etcd_client::keep_alive(std::int64_t lease) {
  TENSORREG_TRY_ASSIGN(auto answer, state_->call("/v3/lease/keepalive", json{{"ID", std::to_string(lease)}}));
  auto ttl = json_int(answer, "TTL");
  if (ttl <= 0) {
    return fail(errc::not_found, fmt::format("cannot keep lease {:x} alive: it expired or was revoked", lease));
  }
  return std::chrono::seconds(ttl);
}

status etcd_client::revoke_lease(std::int64_t lease) {
  auto answer = state_->call("/v3/lease/revoke", json{{"ID", std::to_string(lease)}});
  if (!answer && answer.error().code != errc::not_found) return tl::unexpected(answer.error());
  return {};
}

result<std::chrono::seconds> etcd_client::lease_time_to_live(std::int64_t lease) {
  TENSORREG_TRY_ASSIGN(auto answer, state_->call("/v3/lease/timetolive", json{{"ID", std::to_string(lease)}}));
  // etcd answers TTL -1 for a lease that is gone; 0 is one about to expire.
  auto ttl = json_int(answer, "TTL");
  if (ttl < 0 || answer.find("TTL") == answer.end()) {
    return fail(errc::not_found, fmt::format("lease {:x} expired or was revoked", lease));
  }
  return std::chrono::seconds(ttl);
}

}  // namespace tensorreg::cluster

// ------------------------------------------------------------------------------------------
// etcd_watch

namespace tensorreg::cluster {

struct etcd_watch::state {
  std::string endpoint;
  std::string request;  // the create_request, built once
  std::chrono::milliseconds connect_timeout{1000};
  CURLM* multi = nullptr;
  curl_slist* headers = nullptr;
  std::atomic<bool> stopped{false};

  // The stream while run() reads it: lines of JSON, one message each.
  struct reading {
    const std::function<void()>* changed = nullptr;
    std::string pending;
    std::string failure;  // an error message from etcd, or a line that is not a watch message
  };

  ~state() {
    if (headers != nullptr) curl_slist_free_all(headers);
    if (multi != nullptr) curl_multi_cleanup(multi);
  }

  static std::size_t on_data(char* data, std::size_t size, std::size_t count, void* user) {
    auto& r = *static_cast<reading*>(user);
    r.pending.append(data, size * count);
    for (auto end = r.pending.find('\n'); end != std::string::npos; end = r.pending.find('\n')) {
      const auto line = r.pending.substr(0, end);
      r.pending.erase(0, end + 1);
      if (line.find_first_not_of(" \r\t") == std::string::npos) continue;
      const json message = json::parse(line, nullptr, /*allow_exceptions=*/false);
      const json* result = nullptr;
      if (message.is_object()) {
        if (auto it = message.find("result"); it != message.end() && it->is_object()) result = &*it;
      }
      if (result == nullptr || result->value("canceled", false)) {
        r.failure = message.is_object() && message.contains("error") ? message["error"].dump() : line.substr(0, 200);
        return 0;  // ends the transfer: run() answers UNAVAILABLE and the caller opens it again
      }
      if (result->value("created", false) || result->contains("events")) (*r.changed)();
    }
    return size * count;
  }
};

result<std::unique_ptr<etcd_watch>> etcd_watch::create(std::string endpoint, std::string prefix,
                                                       std::chrono::milliseconds connect_timeout) {
  if (!endpoint.starts_with("http://")) {
    return fail(errc::invalid_argument,
                fmt::format("cannot watch etcd: endpoint '{}' is not http://host:port", endpoint));
  }
  std::call_once(curl_global_once, [] { curl_global_result = curl_global_init(CURL_GLOBAL_DEFAULT); });
  if (curl_global_result != CURLE_OK) {
    return fail(errc::internal, fmt::format("cannot watch etcd: libcurl: {}", curl_easy_strerror(curl_global_result)));
  }
  auto s = std::make_unique<state>();
  s->endpoint = std::move(endpoint);
  s->connect_timeout = connect_timeout;
  s->request =
      json{{"create_request", {{"key", base64_encode(prefix)}, {"range_end", base64_encode(prefix_end(prefix))}}}}
          .dump();
  s->multi = curl_multi_init();
  if (s->multi == nullptr) return fail(errc::internal, "cannot watch etcd: curl_multi_init failed");
  s->headers = curl_slist_append(nullptr, "Content-Type: application/json");
  return std::unique_ptr<etcd_watch>(new etcd_watch(std::move(s)));
}

etcd_watch::etcd_watch(std::unique_ptr<state> s) noexcept : state_(std::move(s)) {}
etcd_watch::~etcd_watch() = default;

void etcd_watch::stop() noexcept {
  state_->stopped.store(true);
  curl_multi_wakeup(state_->multi);
}

status etcd_watch::run(const std::function<void()>& changed) {
  auto& s = *state_;
  if (s.stopped.load()) return {};
  CURL* curl = curl_easy_init();
  if (curl == nullptr) return fail(errc::internal, "cannot watch etcd: curl_easy_init failed");
  const std::string url = s.endpoint + "/v3/watch";
  state::reading reading;
  reading.changed = &changed;
  std::array<char, CURL_ERROR_SIZE> error_text{};
  set_post(curl, url, s.request, &state::on_data, &reading, error_text.data());
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, s.headers);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(s.connect_timeout.count()));
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_PROXY, "");
  // A host whose etcd vanished without closing the connection is noticed by TCP keep-alive.
  curl_easy_setopt(curl, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(curl, CURLOPT_TCP_KEEPIDLE, 5L);
  curl_easy_setopt(curl, CURLOPT_TCP_KEEPINTVL, 5L);
  curl_multi_add_handle(s.multi, curl);
  CURLcode done = CURLE_OK;
  bool ended = false;
  while (!s.stopped.load() && !ended) {
    int running = 0;
    if (curl_multi_perform(s.multi, &running) != CURLM_OK) break;
    int left = 0;
    while (CURLMsg* m = curl_multi_info_read(s.multi, &left)) {
      if (m->msg == CURLMSG_DONE) {
        done = m->data.result;
        ended = true;
      }
    }
    if (running == 0) ended = true;
    if (!ended) curl_multi_poll(s.multi, nullptr, 0, 1000, nullptr);
  }
  curl_multi_remove_handle(s.multi, curl);
  curl_easy_cleanup(curl);
  if (s.stopped.load()) return {};
  std::string reason = !reading.failure.empty() ? "etcd ended the watch: " + reading.failure
                       : done != CURLE_OK
                           ? std::string(error_text[0] != '\0' ? error_text.data() : curl_easy_strerror(done))
                           : std::string("the stream ended");
  return fail(errc::unavailable, fmt::format("cluster catalogue at {} unreachable: watch: {}", s.endpoint, reason));
}

}  // namespace tensorreg::cluster
