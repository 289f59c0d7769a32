// One greedy Generate on an edgespec edge, printed as it streams.
//
//   npm ci
//   node generate.js HOST:PORT "def fib(n):" [MAX_NEW_TOKENS]
//
// The .proto is loaded at run time (no code generation). The loader options matter:
//   keepCase: true   field names as written in the .proto (max_new_tokens). Without it
//                    proto-loader expects camelCase (maxNewTokens) and silently drops the
//                    snake_case fields you pass: the edge then answers INVALID_ARGUMENT
//                    "params.max_new_tokens must be ... got 0".
//   longs: String    64-bit fields (seed, bytes_sent, bytes_received) arrive as decimal
//                    strings: a JavaScript number cannot hold every uint64.
//   oneofs: true     each message says which oneof member it carries: `event` is "tokens"
//                    or "summary" in a GenerateResponse.
//   defaults: true   unset fields read as their proto3 defaults (0, "", []).
// Environment: EDGESPEC_PROTO (path of edgespec/v1/edgespec.proto; default: this checkout's),
// EDGESPEC_TOKEN (the edge's bearer token, if it has one).
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO =
  process.env.EDGESPEC_PROTO ||
  path.join(__dirname, "..", "..", "protos", "edgespec", "v1", "edgespec.proto");

function main() {
  const [address, prompt, maxNewTokens = "32"] = process.argv.slice(2);
  if (!address || !prompt) {
    console.error('usage: node generate.js HOST:PORT "prompt" [MAX_NEW_TOKENS]');
    process.exit(2);
  }
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const edgespec = grpc.loadPackageDefinition(definition).edgespec.v1;
  const client = new edgespec.Edge(address, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (process.env.EDGESPEC_TOKEN) {
    metadata.set("authorization", `Bearer ${process.env.EDGESPEC_TOKEN}`);
  }
  const request = {
    prompt,
    params: { temperature: 0, max_new_tokens: Number(maxNewTokens) }, // greedy
  };
  const call = client.Generate(request, metadata, { deadline: Date.now() + 120000 });
  let summary = null;
  let streamed = "";
  call.on("data", (response) => {
    if (response.event === "tokens") {
      process.stdout.write(response.text); // as each batch of tokens is committed
      streamed += response.text;
    } else if (response.event === "summary") {
      summary = response.summary;
      // A character split across the last tokens is only in the summary's whole text.
      if (summary.text.startsWith(streamed)) {
        process.stdout.write(summary.text.slice(streamed.length));
      }
    }
  });
  call.on("error", (err) => {
    // The field at fault, if any, is in the trailing metadata `edgespec-field`.
    const field = err.metadata ? err.metadata.get("edgespec-field") : [];
    console.error(`\n${grpc.status[err.code]}: ${err.details}` + (field.length ? ` [${field[0]}]` : ""));
    process.exitCode = 1;
  });
  call.on("end", () => {
    process.stdout.write("\n");
    if (summary) {
      const s = summary.stats;
      console.error(
        `${summary.token_ids.length} tokens (${summary.finish_reason}); ` +
          `accepted ${s.accepted}/${s.drafted} drafted in ${s.rounds} rounds; ` +
          `bytes sent ${s.bytes_sent} (int64: a string)`
      );
      console.error(`token_ids ${JSON.stringify(summary.token_ids)}`);
    }
    client.close();
  });
}

main();
