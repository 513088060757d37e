# kiln: dockerignore=# comment\n.git\n/node_modules/\n*.log\n!important.log\n\n**/tmp
# kiln: no-cache
FROM node:20
COPY . /app
