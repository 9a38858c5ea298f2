// Reads one Realtime Database path with the Firebase JS SDK 7 (the seed's client side) and
// prints it as JSON: proof that what dualwrite writes is what the seed's web client reads.
// Usage: node read_with_js_sdk.js DATABASE_URL PATH
const firebase = require("firebase/app");
require("firebase/database");

const [databaseURL, path] = process.argv.slice(2);
firebase.initializeApp({ databaseURL });
firebase
  .database()
  .ref(path)
  .once("value")
  .then((snapshot) => {
    process.stdout.write(JSON.stringify(snapshot.val()));
    process.exit(0);
  })
  .catch((error) => {
    process.stderr.write(String(error));
    process.exit(1);
  });
setTimeout(() => { process.stderr.write("timed out"); process.exit(2); }, 15000);
