// The gateway's client authentication without a server: the token file format and its
// refusals, the file mode check, constant-time comparison, the token bucket on a controlled
// clock, and the Authenticator's per-token rate and concurrency limits counted exactly.

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "dserve/api/auth.h"

namespace dserve::api {
namespace {

using Clock = TokenBucket::Clock;
using std::chrono::milliseconds;

constexpr const char* kAlice = "alice-0123456789abcdef";
constexpr const char* kBob = "bob-0123456789abcdef";

std::string bearer(const std::string& token) {
  return "Bearer " + token;
}

TEST(TokenFile, NamedAndUnnamedTokensCommentsAndBlankLines) {
  auto tokens = parse_token_file(
      std::string("# clients\n\nalice ") + kAlice + "\n   \n" + kBob + "\r\n  # indented comment\n",
      "tokens");
  ASSERT_TRUE(tokens.is_ok()) << tokens.status().to_string();
  ASSERT_EQ(tokens->size(), 2u);
  EXPECT_EQ((*tokens)[0].name, "alice");
  EXPECT_EQ((*tokens)[0].token, kAlice);
  EXPECT_EQ((*tokens)[1].name, "token-5");  // unnamed: called by its line
  EXPECT_EQ((*tokens)[1].token, kBob);
  for (const auto& t : *tokens)
    EXPECT_EQ(t.role, ClientRole::kClient) << t.name;  // without a role: a client
}

TEST(TokenFile, RolesAndTheCallerTheyGive) {
  auto tokens = parse_token_file(
      std::string("alice ") + kAlice + " client\nops " + kBob + " admin\n", "tokens");
  ASSERT_TRUE(tokens.is_ok()) << tokens.status().to_string();
  ASSERT_EQ(tokens->size(), 2u);
  EXPECT_EQ((*tokens)[0].role, ClientRole::kClient);
  EXPECT_EQ((*tokens)[1].role, ClientRole::kAdmin);
  const Authenticator auth(*tokens, {});
  const Caller alice = auth.authenticate(bearer(kAlice)).value();
  EXPECT_EQ(alice.name, "alice");
  EXPECT_FALSE(alice.admin());
  const Caller ops = auth.authenticate(bearer(kBob)).value();
  EXPECT_EQ(ops.name, "ops");
  EXPECT_TRUE(ops.admin());
  // Without a token file nobody is told apart: the one caller may do everything.
  const Authenticator open({}, {});
  EXPECT_TRUE(open.authenticate(std::nullopt).value().admin());
}

TEST(TokenFile, Refusals) {
  struct Case {
    std::string text;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"",
       "tokens: no token (expected one client per line, `TOKEN`, `NAME TOKEN` or `NAME TOKEN "
       "ROLE`)"},
      {"# only a comment\n\n",
       "tokens: no token (expected one client per line, `TOKEN`, `NAME TOKEN` or `NAME TOKEN "
       "ROLE`)"},
      {"a b c d\n",
       "tokens:1: expected `TOKEN`, `NAME TOKEN` or `NAME TOKEN ROLE`, found 4 fields"},
      {std::string("alice ") + kAlice + " root\n",
       "tokens:1: the role is 'root'; expected client or admin"},
      {"alice short\n",
       "tokens:1: the token has 5 characters; expected 16 to 4096 (a short "
       "token can be guessed)"},
      {std::string("alice ") + kAlice + "\nalice " + kBob + "\n",
       "tokens:2: the client name 'alice' is already used on line 1"},
      {std::string("alice ") + kAlice + "\nbob " + kAlice + "\n",
       "tokens:2: the same token as line 1 (each client needs its own)"},
      {std::string("alice \x01") + kAlice + "\n",
       "tokens:1: names and tokens must be visible ASCII characters"},
  };
  for (const Case& c : cases) {
    auto tokens = parse_token_file(c.text, "tokens");
    ASSERT_FALSE(tokens.is_ok()) << c.text;
    EXPECT_EQ(tokens.status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(tokens.status().message(), c.message);
  }
}

TEST(TokenFile, FileMustBePrivateToItsOwner) {
  const std::string path = ::testing::TempDir() + "/dserve-token-file-test";
  std::filesystem::remove(path);
  auto missing = load_token_file(path);
  ASSERT_FALSE(missing.is_ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find(path), std::string::npos);

  std::ofstream(path) << "alice " << kAlice << "\n";
  ASSERT_EQ(::chmod(path.c_str(), 0644), 0);
  auto open = load_token_file(path);
  ASSERT_FALSE(open.is_ok());
  EXPECT_EQ(open.status().message(),
            "token file " + path +
                " has mode 0644: group or others may read or change it; make it private to its "
                "owner (chmod 600)");
  ASSERT_EQ(::chmod(path.c_str(), 0600), 0);
  auto ok = load_token_file(path);
  ASSERT_TRUE(ok.is_ok()) << ok.status().to_string();
  EXPECT_EQ(ok->front().name, "alice");
  std::filesystem::remove(path);
}

// Its size is checked before it is read: a token file of comments larger than the limit used
// to be read whole and accepted.
TEST(TokenFile, LargerThanTheLimitIsRefusedUnread) {
  const std::string path = ::testing::TempDir() + "/dserve-token-file-large";
  {
    std::ofstream out(path);
    out << "alice " << kAlice << "\n";
    const std::string comment = "# " + std::string(78, 'x') + "\n";
    for (size_t written = 0; written <= kMaxCredentialFileBytes; written += comment.size())
      out << comment;
  }
  ASSERT_EQ(::chmod(path.c_str(), 0600), 0);
  auto big = load_token_file(path);
  ASSERT_FALSE(big.is_ok());
  EXPECT_EQ(big.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(big.status().message(),
            "token file '" + path + "' is larger than 1048576 bytes, the limit");
  std::filesystem::remove(path);
}

TEST(ConstantTimeEqual, EqualOnlyForTheSameBytes) {
  EXPECT_TRUE(constant_time_equal("secret-token", "secret-token"));
  EXPECT_FALSE(constant_time_equal("secret-token", "secret-tokem"));
  EXPECT_FALSE(constant_time_equal("secret-token", "secret-toke"));
  EXPECT_FALSE(constant_time_equal("secret-token", std::string_view("secret-token\0", 13)));
  EXPECT_FALSE(constant_time_equal("secret", ""));
  EXPECT_TRUE(constant_time_equal("", ""));
}

TEST(TokenBucket, BurstThenRate) {
  const Clock::time_point t0{};
  TokenBucket bucket(2.0, 2.0, t0);
  EXPECT_TRUE(bucket.try_take(t0));
  EXPECT_TRUE(bucket.try_take(t0));
  EXPECT_FALSE(bucket.try_take(t0));
  EXPECT_FALSE(bucket.try_take(t0 + milliseconds(400)));  // 0.8 of a token
  EXPECT_TRUE(bucket.try_take(t0 + milliseconds(500)));
  EXPECT_FALSE(bucket.try_take(t0 + milliseconds(500)));
  // A long pause refills to the burst, no more.
  EXPECT_TRUE(bucket.try_take(t0 + milliseconds(60000)));
  EXPECT_TRUE(bucket.try_take(t0 + milliseconds(60000)));
  EXPECT_FALSE(bucket.try_take(t0 + milliseconds(60000)));
}

TEST(TokenBucket, FractionalRate) {
  const Clock::time_point t0{};
  TokenBucket bucket(0.5, 1.0, t0);
  EXPECT_TRUE(bucket.try_take(t0));
  EXPECT_FALSE(bucket.try_take(t0 + milliseconds(1999)));
  EXPECT_TRUE(bucket.try_take(t0 + milliseconds(2000)));
}

std::vector<ClientToken> two_clients() {
  return {{"alice", kAlice}, {"bob", kBob}};
}

TEST(Authenticator, ChecksTheBearerToken) {
  Authenticator auth(two_clients(), {});
  EXPECT_TRUE(auth.required());
  EXPECT_EQ(auth.authenticate(bearer(kAlice)).value().name, "alice");
  EXPECT_EQ(auth.authenticate(std::string("bearer  ") + kBob).value().name, "bob");
  for (const std::optional<std::string>& header :
       {std::optional<std::string>{}, std::optional<std::string>{"Bearer"},
        std::optional<std::string>{std::string("Basic ") + kAlice},
        std::optional<std::string>{bearer(std::string(kAlice) + "x")},
        std::optional<std::string>{bearer("")}}) {
    auto client = auth.authenticate(header ? std::optional<std::string_view>(*header)
                                           : std::optional<std::string_view>());
    ASSERT_FALSE(client.is_ok()) << header.value_or("(none)");
    EXPECT_EQ(client.status().code(), StatusCode::kUnauthenticated);
    // The message never repeats a token.
    EXPECT_EQ(client.status().message().find(kAlice), std::string::npos);
  }
  EXPECT_EQ(auth.authenticate(std::nullopt).status().message(),
            "no credentials: send the header `Authorization: Bearer <token>`");
  EXPECT_EQ(auth.authenticate(bearer("wrong-0123456789abcdef")).status().message(),
            "the token is not valid");
}

TEST(Authenticator, WithoutTokensEveryoneIsAnonymous) {
  Authenticator auth({}, {});
  EXPECT_FALSE(auth.required());
  EXPECT_EQ(auth.authenticate(std::nullopt).value().name, "anonymous");
  EXPECT_EQ(auth.authenticate(bearer("anything")).value().name, "anonymous");
}

TEST(Authenticator, RateLimitPerTokenCountedExactly) {
  Authenticator auth(two_clients(), ClientLimits{2.0, 0});
  const Clock::time_point t0 = Clock::now();
  int admitted = 0, refused = 0;
  for (int i = 0; i < 5; ++i) {
    auto a = auth.admit(bearer(kAlice), t0);
    if (a.is_ok()) {
      ++admitted;
    } else {
      ++refused;
      EXPECT_EQ(a.status().code(), StatusCode::kResourceExhausted);
      EXPECT_EQ(a.status().message(),
                "client 'alice' is over the rate limit of 2 requests per second per token "
                "(burst 2); retry later");
    }
  }
  EXPECT_EQ(admitted, 2);
  EXPECT_EQ(refused, 3);
  // bob has his own bucket.
  EXPECT_TRUE(auth.admit(bearer(kBob), t0).is_ok());
  // Half a second later alice has one more.
  EXPECT_TRUE(auth.admit(bearer(kAlice), t0 + milliseconds(500)).is_ok());
  EXPECT_FALSE(auth.admit(bearer(kAlice), t0 + milliseconds(500)).is_ok());
  // A wrong token is refused as such, not counted against anyone.
  EXPECT_EQ(auth.admit(bearer("nobody-0123456789abcdef"), t0).status().code(),
            StatusCode::kUnauthenticated);
}

TEST(Authenticator, ConcurrencyLimitReleasedWithTheAdmission) {
  Authenticator auth(two_clients(), ClientLimits{0, 2});
  auto first = auth.admit(bearer(kAlice));
  auto second = auth.admit(bearer(kAlice));
  ASSERT_TRUE(first.is_ok());
  ASSERT_TRUE(second.is_ok());
  EXPECT_EQ(first->client(), "alice");
  auto third = auth.admit(bearer(kAlice));
  ASSERT_FALSE(third.is_ok());
  EXPECT_EQ(third.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(third.status().message(),
            "client 'alice' has 2 requests running: the concurrency limit is 2 per token");
  EXPECT_TRUE(auth.admit(bearer(kBob)).is_ok());  // released at once: a temporary
  {
    Admission moved = std::move(first).value();  // moving keeps the one slot
    EXPECT_FALSE(auth.admit(bearer(kAlice)).is_ok());
  }
  auto again = auth.admit(bearer(kAlice));
  EXPECT_TRUE(again.is_ok());
  EXPECT_FALSE(auth.admit(bearer(kAlice)).is_ok());
}

TEST(Authenticator, LimitsWithoutTokensBoundEveryoneTogether) {
  Authenticator auth({}, ClientLimits{0, 1});
  auto held = auth.admit(std::nullopt);
  ASSERT_TRUE(held.is_ok());
  auto other = auth.admit(bearer("whoever"));
  ASSERT_FALSE(other.is_ok());
  EXPECT_EQ(other.status().message(),
            "client 'anonymous' has 1 requests running: the concurrency limit is 1 per token");
}

}  // namespace
}  // namespace dserve::api
