"""The ops dashboard (issue 9): server-rendered pages under /ops/ with plain HTML forms (POST,
then a 303 redirect), signed in with a password and a server-side session. It sits on top, like
the API's routes: it calls the same services (app/incidents/queries.py, app/healing/actions.py,
app/policy/service.py) and holds no domain logic of its own. Its templates and stylesheet are
in templates/ here, so they ship with the package."""
