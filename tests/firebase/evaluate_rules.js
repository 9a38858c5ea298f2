// Evaluates Realtime Database security rules with targaryen (npm), for
// tests/deploy/test_firebase_rules.py. Reads {"rules": PATH, "cases": [...]} as JSON on
// standard input; each case is {op: "write"|"read", path, auth, value, data, now}, run
// against a database holding `data` at time `now`. Prints [{allowed, info}, ...] as JSON.
// Usage: node evaluate_rules.js < request.json
const fs = require("fs");
const targaryen = require("targaryen");

const request = JSON.parse(fs.readFileSync(0, "utf8"));
// Parsed and type-checked once: throws on a rule targaryen does not understand.
const rules = targaryen.ruleset(JSON.parse(fs.readFileSync(request.rules, "utf8")));

const results = request.cases.map((c) => {
  const database = targaryen
    .database(rules, c.data === undefined ? null : c.data, c.now)
    .as(c.auth)
    .with({ debug: true });
  let result;
  if (c.op === "write") {
    result = database.write(c.path, c.value, { now: c.now });
  } else if (c.op === "read") {
    result = database.read(c.path, { now: c.now });
  } else {
    throw new Error(`unknown operation ${c.op}`);
  }
  return { allowed: result.allowed, info: result.info };
});
process.stdout.write(JSON.stringify(results));
